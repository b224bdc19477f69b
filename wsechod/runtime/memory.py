"""How much memory this process may use: the default of ``memory_limit``.

The machine's memory (``MemTotal``), or less when the process runs in a control group with
a memory limit, its own or one above it (cgroup v2 ``memory.max``, v1
``memory.limit_in_bytes``: containers, systemd's ``MemoryMax=``): whichever is smallest.
"""

from pathlib import Path

AUTO_SHARE = 4  # the default budget: a quarter of the memory the process may use
MINIMUM = 16 * 2**20  # never less than this, however small the machine


def available(root: Path = Path("/")) -> int:
    """Bytes of memory this process may use (``root``: for tests, a fake file system)."""
    found = [_mem_total(root)]
    for path in _cgroup_limit_files(root):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge number (v1) when there is none
            found.append(int(text))
    return min(found)


def auto_limit(workers: int, root: Path = Path("/")) -> int:
    """``memory_limit = 0``: a quarter of what the process may use, shared by the
    workers (each serving process has a budget of its own)."""
    return max(MINIMUM, available(root) // AUTO_SHARE // max(workers, 1))


def _mem_total(root: Path) -> int:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**62  # unknown: the control group's limit, if any, decides


def _cgroup_limit_files(root: Path) -> list[Path]:
    """The memory limit files of this process's control group and of every group above it
    (a limit set on a parent, a systemd slice or a container's group, holds too), up to
    the hierarchy's root."""
    files: list[Path] = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, group = line.split(":", 2)
        parts = [part for part in group.split("/") if part]
        if controllers == "":  # cgroup v2: one hierarchy
            base, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        files += [base.joinpath(*parts[:depth], name) for depth in range(len(parts), -1, -1)]
    return files
