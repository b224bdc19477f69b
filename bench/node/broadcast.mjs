// The Node peer for fan-out: ws's README "broadcast to every other client" loop, with one
// channel per URL path, plus the same SIGTERM drain as echo.mjs.
// ws has no public API to frame a message once for many clients, so each send frames it.
// Usage: node broadcast.mjs [PORT]; prints "listening 127.0.0.1:PORT".
import WebSocket, { WebSocketServer } from "ws";

const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(process.argv[2] ?? 0) });
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
  for (const ws of wss.clients) ws.close(1001, "server shutting down");
}
process.once("SIGTERM", drain);
process.once("SIGINT", drain);
