// The Node peer for fan-out: ws's README "broadcast to every other client" loop, with one
// channel per URL path, plus the same SIGTERM drain as echo.mjs.
// ws has no public API to frame a message once for many clients, so each send frames it.
// Usage: node broadcast.mjs [PORT]; prints "listening 127.0.0.1:PORT". With BENCH_TLS_CERT
// and BENCH_TLS_KEY in the environment: over TLS (node:https).
import { readFileSync } from "node:fs";
import { createServer } from "node:https";
import WebSocket, { WebSocketServer } from "ws";

const port = Number(process.argv[2] ?? 0);
const server = tlsServer();
const wss = new WebSocketServer(server ? { server } : { host: "127.0.0.1", port });
server?.listen(port, "127.0.0.1");

function tlsServer() {
  const cert = process.env.BENCH_TLS_CERT;
  if (!cert) return undefined;
  return createServer({ cert: readFileSync(cert), key: readFileSync(process.env.BENCH_TLS_KEY) });
}
const channels = new Map();

wss.on("connection", (ws, request) => {
  const path = new URL(request.url, "http://localhost").pathname;
  let members = channels.get(path);
  if (members === undefined) channels.set(path, (members = new Set()));
  members.add(ws);
  ws.on("error", console.error);
  ws.on("message", (data, isBinary) => {
    for (const client of members) {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
  ws.on("close", () => {
    members.delete(ws);
    if (members.size === 0) channels.delete(path);
  });
});
wss.on("listening", () => console.log(`listening 127.0.0.1:${wss.address().port}`));

function drain() {
  setTimeout(() => process.exit(0), 10_000).unref();
  wss.close();
  server?.close();
  for (const ws of wss.clients) ws.close(1001, "server shutting down");
}
process.once("SIGTERM", drain);
process.once("SIGINT", drain);
