// extended-mind web page: manage memories, ask with streaming, and show cited spans in their documents.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("extended-mind-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("extended-mind-key", keyInput.value); refresh(); });
let modelId = null;
const docCache = new Map();

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try { const body = await response.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch (e) { return response.status + " " + response.statusText; }
}

// Server-sent events from a fetch response: calls onData with each parsed `data:` payload until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        onData(parsed);
      }
    }
  }
}

function selectedMemories() {
  return Array.from(document.querySelectorAll("#memories input:checked")).map((el) => el.value);
}

async function refresh(select) {
  $("error").textContent = "";
  try {
    const models = await (await api("/v1/models")).json();
    modelId = models.data[0].id;
    $("model").textContent = "model: " + modelId;
    const keep = new Set(selectedMemories());
    if (select) keep.add(select);
    const list = await (await api("/v1/memories")).json();
    const ul = $("memories");
    ul.replaceChildren();
    for (const m of list.data) {
      const li = document.createElement("li");
      li.dataset.memory = m.id;
      const box = document.createElement("input");
      box.type = "checkbox"; box.value = m.id; box.checked = keep.has(m.id); box.id = "mem-" + m.id;
      const label = document.createElement("label");
      label.htmlFor = box.id; label.textContent = m.id; label.style.display = "inline";
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = m.error ? "unreadable: " + m.error : `${m.documents} doc · ${m.tokens} tok`;
      const del = document.createElement("button");
      del.textContent = "delete"; del.title = "delete memory " + m.id;
      del.addEventListener("click", async () => {
        if (!confirm(`Delete memory ${m.id}?`)) return;
        try { await api("/v1/memories/" + encodeURIComponent(m.id), { method: "DELETE" }); } catch (e) { showError(e); }
        refresh();
      });
      li.append(box, label, meta, del);
      ul.append(li);
    }
    if (!list.data.length) ul.innerHTML = '<li class="muted">none yet</li>';
  } catch (e) { showError(e); }
}

function showError(e) { $("error").textContent = String(e.message || e); }

$("create-memory").addEventListener("click", async () => {
  const name = $("memory-name").value.trim();
  const form = new FormData();
  form.append("name", name);
  form.append("stream", "true");
  if ($("memory-text").value.trim()) form.append("text", $("memory-text").value);
  for (const f of $("memory-files").files) form.append("files", f, f.name);
  const bar = $("memorize-progress"), status = $("memorize-status");
  bar.hidden = false; bar.value = 0; status.textContent = "memorizing…"; $("error").textContent = "";
  try {
    const response = await api("/v1/memories", { method: "POST", body: form });
    let made = null;
    await readEvents(response, (d) => {
      if (d.object === "memory.progress") { bar.value = d.done / d.total; status.textContent = `memorizing ${d.done} / ${d.total} tokens`; }
      else if (d.object === "memory") made = d;
    });
    if (made) status.textContent = `memorized ${made.tokens} tokens into "${made.id}"`;
    $("memory-text").value = ""; $("memory-files").value = "";
    refresh(name);
  } catch (e) { status.textContent = ""; showError(e); }
  finally { bar.hidden = true; }
});

$("ask").addEventListener("click", async () => {
  const question = $("question").value.trim();
  if (!question) { showError("type a question first"); return; }
  $("answer").textContent = ""; $("citations").replaceChildren(); $("sources").replaceChildren(); $("error").textContent = "";
  const raw = $("raw").checked;
  const body = { model: modelId, stream: true, max_tokens: Number($("max-tokens").value) || 96, topk: Number($("topk").value) };
  if (raw) body.prompt = $("question").value; else body.messages = [{ role: "user", content: question }];
  const memories = selectedMemories();
  if (memories.length) body.memory = memories;
  $("ask").disabled = true;
  try {
    const response = await api(raw ? "/v1/completions" : "/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let citations = [], final = {};
    await readEvents(response, (chunk) => {
      const choice = chunk.choices[0] || {};
      const piece = raw ? choice.text : (choice.delta || {}).content;
      if (piece) $("answer").textContent += piece;
      if (chunk.citations) { citations = chunk.citations; final = chunk; }
    });
    if (final.warnings && final.warnings.length) showError(final.warnings.join("; "));
    await showCitations(citations, noCitationReason(memories, Number(body.topk), final.blocks_read));
  } catch (e) { showError(e); }
  finally { $("ask").disabled = false; }
});

async function documentText(memory, doc) {
  const key = memory + "\u0000" + doc;
  if (!docCache.has(key)) {
    const url = `/v1/memories/${encodeURIComponent(memory)}/documents/${encodeURIComponent(doc)}`;
    docCache.set(key, (await (await api(url)).json()).text);
  }
  return docCache.get(key);
}

// Why an answer cites nothing: the page knows what it asked for and the server says how many blocks were read.
function noCitationReason(memories, topk, blocksRead) {
  if (!memories.length) return "no memory selected";
  if (topk === 0) return "top-k is 0: memory is off";
  if (blocksRead === 0) return "no memory block was relevant to this question, so none was read (the answer is the model's own)";
  return "the answer attended to no memory token";
}

async function showCitations(citations, reason) {
  const list = $("citations");
  if (!citations.length) {
    const li = document.createElement("li");
    li.className = "muted"; li.textContent = `no citations: ${reason}`;
    list.replaceChildren(li);
    return;
  }
  const top = Math.max(...citations.map((c) => c.weight));
  const byDoc = new Map();
  citations.forEach((c, i) => {
    const li = document.createElement("li");
    const w = document.createElement("span");
    w.className = "weight"; w.textContent = `[${c.weight.toFixed(3)}] `;
    li.append(w, `${c.memory}/${c.document}: “${c.text}”`);
    list.append(li);
    const k = c.memory + "\u0000" + c.document;
    if (!byDoc.has(k)) byDoc.set(k, { memory: c.memory, document: c.document, spans: [] });
    byDoc.get(k).spans.push({ start: c.start, end: c.end, weight: c.weight, rank: i + 1 });
  });
  docCache.clear();  // documents may have changed since the last answer
  for (const { memory, document: doc, spans } of byDoc.values()) {
    const text = await documentText(memory, doc);
    const box = document.createElement("div");
    box.className = "source";
    const h = document.createElement("h4");
    h.textContent = `${memory} / ${doc}`;
    const pre = document.createElement("pre");
    spans.sort((a, b) => a.start - b.start);
    let pos = 0;
    for (const s of spans) {
      if (s.start < pos) continue;  // overlapping span: the first one shown covers it
      pre.append(text.slice(pos, s.start));
      const mark = document.createElement("mark");
      mark.className = "cited";
      mark.style.setProperty("--w", (0.25 + 0.75 * s.weight / top).toFixed(2));
      mark.title = `citation ${s.rank}, weight ${s.weight.toFixed(4)}`;
      mark.append(text.slice(s.start, s.end));
      const sup = document.createElement("sup");
      sup.textContent = `[${s.rank}] ${s.weight.toFixed(3)}`;
      mark.append(sup);
      pre.append(mark);
      pos = s.end;
    }
    pre.append(text.slice(pos));
    box.append(h, pre);
    $("sources").append(box);
  }
  const first = document.querySelector("mark.cited");
  if (first) first.scrollIntoView({ block: "nearest" });
}

refresh();
