// The Node peer for echo: ws's server as its README shows it, plus a SIGTERM drain like
// wsechod's (close every client with 1001, exit when all are closed, 10 s at most).
// package.json adds bufferutil, ws's documented performance opt-in for Node before 26.12
// (native masking; without it ws unmasks in JavaScript, which is slow for large messages).
// Usage: node echo.mjs [PORT] [deflate]; prints "listening 127.0.0.1:PORT". With "deflate":
// permessage-deflate with ws's defaults (perMessageDeflate: true), for the deflate cases.
import { WebSocketServer } from "ws";

const wss = new WebSocketServer({
  host: "127.0.0.1",
  port: Number(process.argv[2] ?? 0),
  perMessageDeflate: process.argv[3] === "deflate",
});

wss.on("connection", (ws) => {
  ws.on("error", console.error);
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
});
wss.on("listening", () => console.log(`listening 127.0.0.1:${wss.address().port}`));

function drain() {
  setTimeout(() => process.exit(0), 10_000).unref();
  wss.close(); // stop accepting; since ws 8 this leaves open connections alone
  for (const ws of wss.clients) ws.close(1001, "server shutting down");
}
process.once("SIGTERM", drain);
process.once("SIGINT", drain);
