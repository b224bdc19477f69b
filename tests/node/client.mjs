// Node's ws as an independent client: `node client.mjs URL echo|chatter [MAXSIZE] [deflate]`.
// echo: send text and binary messages of many sizes, check every echo, print a JSON summary.
// chatter: ping-pong numbered messages until the server closes, then print what happened.
// peer: send MAXSIZE messages (m1, m2...) to a test peer URL, keep what comes (messages,
// pings, errors) and print it when the connection closes.
import WebSocket from "ws";

const [url, mode, maxSize = "65536", compression = "none"] = process.argv.slice(2);
const ws = new WebSocket(url, { perMessageDeflate: compression === "deflate", maxPayload: 0 });
const print = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const errors = [];

function messages() {
  const out = [];
  for (const n of [1, 2, 125, 126, 127, 65535, Number(maxSize)]) {
    const bytes = Buffer.alloc(n);
    for (let i = 0; i < n; i++) bytes[i] = (i * 31 + n) & 0xff;
    out.push({ data: bytes, binary: true });
    out.push({ data: "ü".repeat(Math.floor(n / 2)) + "x".repeat(n % 2), binary: false });
  }
  return out;
}

if (mode === "echo") {
  const todo = messages();
  let i = 0;
  ws.on("open", () => ws.send(todo[0].data, { binary: todo[0].binary }));
  ws.on("message", (data, isBinary) => {
    const want = todo[i];
    const same = isBinary === want.binary && Buffer.compare(Buffer.from(data), Buffer.from(want.data)) === 0;
    if (!same) {
      print({ ok: false, index: i, isBinary, length: data.length });
      process.exit(1);
    }
    if (++i === todo.length) {
      print({ ok: true, count: i, extensions: ws.extensions });
      ws.close(1000);
    } else {
      ws.send(todo[i].data, { binary: todo[i].binary });
    }
  });
} else if (mode === "chatter") {
  let sent = 0;
  const echoed = [];
  const next = () => ws.send(`n${sent++}`);
  ws.on("open", next);
  ws.on("message", (data) => {
    echoed.push(data.toString());
    if (echoed.length === 5) print({ event: "warm" });
    if (ws.readyState === WebSocket.OPEN) next();
  });
  ws.on("close", (code, reason) => {
    const prefix = echoed.every((m, k) => m === `n${k}`);
    print({ event: "closed", code, reason: reason.toString(), sent, echoed: echoed.length, prefix });
  });
} else if (mode === "peer") {
  const got = [];
  const pings = [];
  ws.on("open", () => {
    for (let i = 1; i <= Number(maxSize); i++) ws.send(`m${i}`);
  });
  ws.on("message", (data) => got.push(data.toString()));
  ws.on("ping", (data) => {
    pings.push(data.toString());
    if (pings.length === 2) ws.close(1000);
  });
  ws.on("close", (code, reason) => print({ code, reason: reason.toString(), got, pings, errors }));
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
ws.on("error", (err) => {
  if (mode === "peer") return void errors.push(String(err));
  print({ ok: false, error: String(err) });
  process.exit(1);
});
