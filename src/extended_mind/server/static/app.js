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
  return Array.from(document.querySelectorAll("#memories input[type=checkbox]:checked")).map((el) => el.value);
}

// The memories last asked with are selected again when the page opens (kept in this browser).
function rememberSelection() { localStorage.setItem("extended-mind-selected", JSON.stringify(selectedMemories())); }
function rememberedSelection() {
  try { return JSON.parse(localStorage.getItem("extended-mind-selected") || "[]"); } catch (e) { return []; }
}
let firstRefresh = true;

async function refresh(select) {
  $("error").textContent = "";
  try {
    const models = await (await api("/v1/models")).json();
    modelId = models.data[0].id;
    $("model").textContent = "model: " + modelId;
    const keep = new Set(firstRefresh ? rememberedSelection() : selectedMemories());
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
      del.textContent = "delete"; del.title = "delete memory " + m.id; del.className = "delete-memory";
      del.addEventListener("click", async () => {
        if (!confirm(`Delete memory ${m.id}?`)) return;
        try { await api("/v1/memories/" + encodeURIComponent(m.id), { method: "DELETE" }); } catch (e) { showError(e); }
        refresh();
      });
      const docs = document.createElement("details");
      docs.className = "documents";
      const summary = document.createElement("summary");
      summary.textContent = "documents";
      docs.append(summary);
      docs.addEventListener("toggle", () => { if (docs.open) listDocuments(m.id, docs); });
      li.append(box, label, meta, del, docs);
      ul.append(li);
    }
    if (!list.data.length) ul.innerHTML = '<li class="muted">none yet</li>';
    if (firstRefresh && !selectedMemories().length && list.data.length === 1) {
      ul.querySelector("input[type=checkbox]").checked = true;  // the only memory: selected
    }
    firstRefresh = false;
  } catch (e) { showError(e); }
}

// A memory's documents, each with a button that removes it from the memory.
async function listDocuments(name, box) {
  box.querySelectorAll("ul").forEach((el) => el.remove());
  const ul = document.createElement("ul");
  try {
    const info = await (await api("/v1/memories/" + encodeURIComponent(name))).json();
    for (const d of info.data) {
      const li = document.createElement("li");
      li.dataset.document = d.id;
      const rm = document.createElement("button");
      rm.textContent = "remove"; rm.title = `remove ${d.id} from ${name}`;
      rm.addEventListener("click", async () => {
        if (!confirm(`Remove ${d.id} from ${name}?`)) return;
        try {
          await api(`/v1/memories/${encodeURIComponent(name)}/documents/${encodeURIComponent(d.id)}`, { method: "DELETE" });
          await refresh();
        } catch (e) { showError(e); }
      });
      li.append(`${d.id} (${d.tokens} tok) `, rm);
      ul.append(li);
    }
  } catch (e) { showError(e); }
  box.append(ul);
}

function showError(e) { $("error").textContent = String(e.message || e); }

const NAME_RULE = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/;

// Memorize the pasted text and the chosen files into a new memory, or (`add`) into the existing one named.
async function memorize(add) {
  const name = $("memory-name").value.trim();
  const status = $("memorize-status"), problem = $("memorize-error");
  status.textContent = ""; problem.textContent = "";
  if (!name) { problem.textContent = "give the memory a name first"; return; }
  if (!NAME_RULE.test(name)) {
    problem.textContent = "a memory name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit";
    return;
  }
  const text = $("memory-text").value, files = $("memory-files").files;
  if (!text.trim() && !files.length) { problem.textContent = "paste a document or choose files to memorize"; return; }
  const form = new FormData();
  if (!add) form.append("name", name);
  form.append("stream", "true");
  if (text.trim()) {
    form.append("text", text);
    if ($("memory-text-name").value.trim()) form.append("text_name", $("memory-text-name").value.trim());
  }
  for (const f of files) form.append("files", f, f.name);
  const bar = $("memorize-progress");
  bar.hidden = false; bar.value = 0; status.textContent = "memorizing…";
  try {
    const path = add ? `/v1/memories/${encodeURIComponent(name)}/documents` : "/v1/memories";
    const response = await api(path, { method: "POST", body: form });
    let made = null;
    await readEvents(response, (d) => {
      if (d.object === "memory.progress") { bar.value = d.done / d.total; status.textContent = `memorizing ${d.done} / ${d.total} tokens`; }
      else if (d.object === "memory") made = d;
    });
    if (made) status.textContent = add ? `added to "${made.id}": it now holds ${made.documents} doc · ${made.tokens} tokens`
                                       : `memorized ${made.tokens} tokens into "${made.id}"`;
    $("memory-text").value = ""; $("memory-text-name").value = ""; $("memory-files").value = "";
    refresh(name);
  } catch (e) { status.textContent = ""; problem.textContent = String(e.message || e); }
  finally { bar.hidden = true; }
}
$("create-memory").addEventListener("click", () => memorize(false));
$("add-documents").addEventListener("click", () => memorize(true));

$("ask").addEventListener("click", async () => {
  const question = $("question").value.trim();
  if (!question) { showError("type a question first"); return; }
  $("answer").textContent = ""; $("citations").replaceChildren(); $("sources").replaceChildren(); $("error").textContent = "";
  const raw = $("raw").checked;
  const body = { model: modelId, stream: true, max_tokens: Number($("max-tokens").value) || 96, topk: Number($("topk").value) };
  const prefix = $("answer-prefix").value;
  if (raw) body.prompt = $("question").value + (prefix ? "\n" + prefix : "");
  else {
    body.messages = [{ role: "user", content: question }];
    if (prefix) body.answer_prefix = prefix;
  }
  const memories = selectedMemories();
  if (memories.length) body.memory = memories;
  rememberSelection();
  if (prefix) $("answer").textContent = prefix;  // the answer goes on from the prefix
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
  // shown as shares of all the cited weight (they sum to 1): the raw weights are attention x value norm
  const total = citations.reduce((sum, c) => sum + c.weight, 0) || 1;
  citations = citations.map((c) => Object.assign({}, c, { weight: c.weight / total }));
  const top = Math.max(...citations.map((c) => c.weight));
  const byDoc = new Map();
  citations.forEach((c, i) => {
    const li = document.createElement("li");
    const w = document.createElement("span");
    w.className = "weight"; w.textContent = `[${(100 * c.weight).toFixed(1)}%] `;
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
      mark.title = `citation ${s.rank}, ${(100 * s.weight).toFixed(1)}% of the cited weight`;
      mark.append(text.slice(s.start, s.end));
      const sup = document.createElement("sup");
      sup.textContent = `[${s.rank}] ${(100 * s.weight).toFixed(1)}%`;
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
