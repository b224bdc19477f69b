"""Which worker's socket the kernel gives a new connection to, with several workers.

Each TCP listener is bound once per worker with SO_REUSEPORT: a reuseport group (one per
address: IPv4 and IPv6 ones are separate groups), whose sockets the kernel numbers in the
order they listened, so socket ``i`` of each group is worker ``i``'s. By default the kernel
picks one by a hash of the client's address and port, blind to whether anyone accepts on
it: a worker that died, and waits for its restart (up to 10 s of backoff), would still get
its share of the newcomers, left unanswered in its socket's backlog.

So the main process, which keeps every copy open (closing one would reset the connections
queued on it, and renumber the group), attaches a classic BPF program to each group
(SO_ATTACH_REUSEPORT_CBPF) whenever the set of workers that accept changes: it picks one
of those workers' sockets at random (each connection on its own, so the spread is even
whatever the clients' addresses). With all of them, or none, accepting, it picks among
all. A program returning an index beyond the group makes the kernel fall back to its hash.
"""

import ctypes
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>

# Classic BPF (<linux/filter.h>): code, jt, jf, k.
Instruction = tuple[int, int, int, int]
LD_W_ABS = 0x20  # A = the 32-bit word at k (an ancillary field: SKF_AD_OFF + n)
ALU_MOD_K = 0x94  # A %= k
JMP_JEQ_K = 0x15  # pc += jt if A == k else jf
RET_K = 0x06  # return k
RET_A = 0x16  # return A
SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM: a random u32
MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS: 2 + 2 per live worker is far below, at 1024


def program(live: Sequence[int], size: int) -> list[Instruction]:
    """For a group of ``size`` sockets: a random one of the ``live`` ones (indices); all of
    them if ``live`` is empty. A jump table maps the random number, modulo their count, to
    their indices."""
    chosen = sorted(set(live)) or list(range(size))
    if not all(0 <= index < size for index in chosen):
        raise ValueError(f"socket indices {chosen} out of a group of {size}")
    head = [(LD_W_ABS, 0, 0, SKF_AD_RANDOM), (ALU_MOD_K, 0, 0, len(chosen))]
    if chosen == list(range(size)):
        return [*head, (RET_A, 0, 0, 0)]
    table: list[Instruction] = []
    for n, index in enumerate(chosen[:-1]):
        table += [(JMP_JEQ_K, 0, 1, n), (RET_K, 0, 0, index)]  # not n: skip its return
    return [*head, *table, (RET_K, 0, 0, chosen[-1])]


def attach(sock: socket.socket, instructions: Sequence[Instruction]) -> None:
    """Give ``sock``'s reuseport group this program (replacing the one it had); OSError if
    the kernel refuses it."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(instructions), ctypes.addressof(buffer))  # sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class Steering:
    """The reuseport groups of a daemon's workers (each a list of sockets, worker ``i``'s
    at ``i``), and the workers their programs send newcomers to."""

    def __init__(self, groups: Sequence[Sequence[socket.socket]], size: int) -> None:
        self.groups = [group[0] for group in groups if group]  # any socket names its group
        self.size = size
        self.live: tuple[int, ...] = tuple(range(size))  # as without a program: all of them

    def update(self, live: Sequence[int]) -> bool:
        """Steer to the ``live`` workers (none: all), if that is not the case already;
        whether the programs changed. OSError if the kernel refuses one."""
        wanted = tuple(sorted(set(live))) or tuple(range(self.size))
        if wanted == self.live or not self.groups:
            return False
        instructions = program(wanted, self.size)
        for sock in self.groups:
            attach(sock, instructions)
        self.live = wanted
        return True
