// The Node peer for echo: ws's server as its README shows it, plus a SIGTERM drain like
// wsechod's (close every client with 1001, exit when all are closed, 10 s at most).
// package.json adds bufferutil, ws's documented performance opt-in for Node before 26.12
// (native masking; without it ws unmasks in JavaScript, which is slow for large messages).
// Usage: node echo.mjs [PORT] [deflate]; prints "listening 127.0.0.1:PORT". With "deflate":
// permessage-deflate with ws's defaults (perMessageDeflate: true), for the deflate cases.
// With BENCH_TLS_CERT and BENCH_TLS_KEY in the environment: over TLS (node:https).
import { readFileSync } from "node:fs";
import { createServer } from "node:https";
import { WebSocketServer } from "ws";

const port = Number(process.argv[2] ?? 0);
const perMessageDeflate = process.argv[3] === "deflate";
const server = tlsServer();
const wss = new WebSocketServer(
  server ? { server, perMessageDeflate } : { host: "127.0.0.1", port, perMessageDeflate },
);
server?.listen(port, "127.0.0.1");

function tlsServer() {
  const cert = process.env.BENCH_TLS_CERT;
  if (!cert) return undefined;
  return createServer({ cert: readFileSync(cert), key: readFileSync(process.env.BENCH_TLS_KEY) });
}

wss.on("connection", (ws) => {
  ws.on("error", console.error);
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
});
wss.on("listening", () => console.log(`listening 127.0.0.1:${wss.address().port}`));

function drain() {
  setTimeout(() => process.exit(0), 10_000).unref();
  wss.close(); // stop accepting; since ws 8 this leaves open connections alone
  server?.close();
  for (const ws of wss.clients) ws.close(1001, "server shutting down");
}
process.once("SIGTERM", drain);
process.once("SIGINT", drain);
