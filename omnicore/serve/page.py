"""The page at ``/``: a chat with image upload whose answer streams in, and an image panel. Plain HTML, CSS and JS
in one document (no build step, nothing fetched from elsewhere: it works offline), calling the server's own API."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>omnicore</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d0d5dd; --accent: #2e5bff; --bad: #b42318; --bg: #f7f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  header { padding: 12px 20px; background: #fff; border-bottom: 1px solid var(--line); display: flex; gap: 16px;
           align-items: center; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  #status { color: var(--muted); }
  #key-row { margin-left: auto; display: none; }
  #error { color: var(--bad); background: #fef3f2; border: 1px solid #fecdca; padding: 8px 12px; margin: 12px 20px 0;
           border-radius: 6px; display: none; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 16px; padding: 16px 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
  h2 { font-size: 16px; margin: 0 0 10px; }
  label { color: var(--muted); font-size: 13px; }
  input, textarea, button { font: inherit; }
  input[type=text], input[type=number], input[type=password], textarea { border: 1px solid var(--line);
           border-radius: 6px; padding: 6px 8px; }
  textarea { width: 100%; resize: vertical; min-height: 56px; }
  button { background: var(--accent); color: #fff; border: 0; border-radius: 6px; padding: 7px 16px; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  .row { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
  .row input[type=number] { width: 84px; }
  #drop { border: 2px dashed var(--line); border-radius: 8px; padding: 10px; color: var(--muted); min-height: 84px;
          display: flex; align-items: center; justify-content: center; gap: 12px; flex-wrap: wrap; }
  #drop.over { border-color: var(--accent); background: #eef2ff; }
  #preview { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated; display: none;
             border-radius: 4px; border: 1px solid var(--line); }
  .pick { color: var(--accent); text-decoration: underline; cursor: pointer; font-size: 15px; }
  button.quiet { background: #fff; color: var(--fg); border: 1px solid var(--line); padding: 4px 10px; }
  #log { display: flex; flex-direction: column; gap: 8px; margin: 10px 0; max-height: 420px; overflow-y: auto; }
  .msg { padding: 8px 10px; border-radius: 8px; white-space: pre-wrap; word-break: break-word; }
  .user { background: #eef2ff; align-self: flex-end; max-width: 85%; }
  .assistant { background: #f2f4f7; align-self: flex-start; max-width: 85%; min-height: 1.4em; }
  .msg img { display: block; width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated;
             margin-bottom: 4px; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(128px, 1fr)); gap: 8px; margin-top: 10px; }
  #grid img { width: 100%; image-rendering: pixelated; border-radius: 4px; border: 1px solid var(--line); }
</style>
</head>
<body>
<header>
  <h1>omnicore</h1>
  <span id="status">connecting...</span>
  <span id="key-row"><label for="api-key">API key</label> <input id="api-key" type="password" size="18"></span>
</header>
<div id="error" role="alert"></div>
<main>
  <section id="chat">
    <h2>Ask about an image</h2>
    <div id="drop">
      <img id="preview" alt="the image to ask about">
      <span id="drop-text">Drop an image here or</span>
      <label class="pick">choose a file<input id="file" type="file" accept="image/png,image/jpeg,image/webp" hidden></label>
      <button id="clear-image" class="quiet" type="button" style="display:none">remove</button>
    </div>
    <div id="log"></div>
    <textarea id="question" placeholder="Ask a question (Enter sends, Shift+Enter for a new line)"></textarea>
    <div class="row">
      <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
      <label>max tokens <input id="max-tokens" type="number" min="1" value="64"></label>
      <label>seed <input id="chat-seed" type="number" placeholder="random"></label>
      <button id="send">Send</button>
    </div>
  </section>
  <section id="images">
    <h2>Draw images</h2>
    <input id="prompt" type="text" placeholder="a red circle on the left" style="width:100%">
    <div class="row">
      <label>images <input id="n" type="number" min="1" value="4"></label>
      <label>guidance <input id="guidance" type="number" step="0.5" value="3"></label>
      <label>seed <input id="seed" type="number" placeholder="random"></label>
      <button id="generate">Generate</button>
    </div>
    <div id="grid"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let modelName = null, imageUrl = null;

function showError(message) { const e = $("error"); e.textContent = message; e.style.display = message ? "block" : "none"; }
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function failure(response) {
  try { const body = await response.json(); return body.error && body.error.message || response.statusText; }
  catch (e) { return response.status + " " + response.statusText; }
}
function numberOr(id, fallback) { const v = $(id).value.trim(); return v === "" ? fallback : Number(v); }

async function poll() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    if (h.status === "ready") {
      modelName = h.model;
      $("status").textContent = "model " + h.model + " ready" + (h.image_size ? " (images " + h.image_size + ")" : "");
      $("key-row").style.display = h.auth ? "inline" : "none";
      $("images").style.display = h.tasks.includes("t2i") ? "" : "none";
      $("drop").style.display = h.has_encoder ? "" : "none";
      return;
    }
    $("status").textContent = "model " + h.status + (h.error ? ": " + h.error : "");
    if (h.status === "failed") return;
  } catch (e) { $("status").textContent = "server unreachable"; }
  setTimeout(poll, 1000);
}

function setImage(file) {
  if (!file) return;
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) { showError("only PNG, JPEG or WebP images: " + file.name); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl; $("preview").style.display = "block";
    $("clear-image").style.display = ""; $("drop-text").textContent = file.name;
    showError("");
  };
  reader.readAsDataURL(file);
}
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("clear-image").addEventListener("click", () => {
  imageUrl = null; $("preview").style.display = "none"; $("clear-image").style.display = "none";
  $("drop-text").textContent = "Drop an image here or"; $("file").value = "";
});
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => setImage(e.dataTransfer.files[0]));

function bubble(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) { const im = document.createElement("img"); im.src = image; div.appendChild(im); }
  const span = document.createElement("span"); span.textContent = text; div.appendChild(span);
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight;
  return span;
}

async function send() {
  const question = $("question").value.trim();
  if (!question && !imageUrl) return;
  showError("");
  const content = [];
  if (imageUrl) content.push({ type: "image_url", image_url: { url: imageUrl } });
  content.push({ type: "text", text: question });
  const body = { model: modelName, messages: [{ role: "user", content: content }], stream: true,
                 temperature: numberOr("temperature", 0), max_tokens: numberOr("max-tokens", 64) };
  const seed = numberOr("chat-seed", null);
  if (seed !== null) body.seed = seed;
  bubble("user", question, imageUrl);
  $("question").value = "";
  const answer = bubble("assistant", "");
  answer.parentElement.classList.add("streaming");
  $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) { answer.parentElement.remove(); showError(await failure(r)); return; }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) { showError(msg.error.message); continue; }
        for (const c of msg.choices) if (c.index === 0 && c.delta.content) answer.textContent += c.delta.content;
      }
    }
    answer.parentElement.classList.remove("streaming");
    answer.parentElement.classList.add("done");
  } catch (e) { showError("request failed: " + e); }
  finally { $("send").disabled = false; }
}
$("send").addEventListener("click", send);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });

async function generate() {
  showError("");
  const body = { model: modelName, prompt: $("prompt").value, n: numberOr("n", 1), response_format: "b64_json",
                 guidance_scale: numberOr("guidance", 1) };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = seed;
  $("generate").disabled = true;
  try {
    const r = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) { showError(await failure(r)); return; }
    const result = await r.json();
    const grid = $("grid");
    grid.textContent = "";
    for (const d of result.data) {
      const im = document.createElement("img");
      im.src = "data:image/png;base64," + d.b64_json; im.alt = body.prompt;
      grid.appendChild(im);
    }
  } catch (e) { showError("request failed: " + e); }
  finally { $("generate").disabled = false; }
}
$("generate").addEventListener("click", generate);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") generate(); });
poll();
</script>
</body>
</html>
"""
