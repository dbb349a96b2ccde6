// Streams /v1/chat/completions (server-sent events) with fetch; answers go in with textContent, never as HTML.
(() => {
  const cfg = JSON.parse(document.getElementById("cfg").dataset.cfg);
  const log = document.getElementById("log");
  const form = document.getElementById("form");
  const input = document.getElementById("prompt");
  const send = document.getElementById("send");
  const key = document.getElementById("key");
  let history = [];
  function add(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    log.appendChild(div);
    div.scrollIntoView({block: "end"});
    return div;
  }
  document.getElementById("reset").addEventListener("click", () => { history = []; log.replaceChildren(); });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    input.value = "";
    add("user", text);
    history.push({role: "user", content: text});
    const out = add("assistant", "");
    send.disabled = true;
    const headers = {"Content-Type": "application/json"};
    if (key && key.value) headers["Authorization"] = "Bearer " + key.value;
    try {
      const res = await fetch(location.origin + "/v1/chat/completions", {  // origin: never the credentials a URL may carry
        method: "POST", headers,
        body: JSON.stringify({model: cfg.model, messages: history, stream: true,
                              max_tokens: Number(document.getElementById("max").value) || 256})});
      if (!res.ok) {
        const body = await res.json().catch(() => ({}));
        throw new Error((body.error && body.error.message) || res.statusText);
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        const events = buffer.split("\n\n");
        buffer = events.pop();
        for (const event of events) {
          const data = event.replace(/^data: /, "");
          if (data === "[DONE]") continue;
          const delta = JSON.parse(data).choices[0].delta || {};
          if (delta.content) out.textContent += delta.content;
        }
      }
      history.push({role: "assistant", content: out.textContent});
      out.dataset.done = "1";
    } catch (err) {
      history.pop();
      out.remove();
      add("error", "error: " + err.message);
    } finally {
      send.disabled = false;
      input.focus();
    }
  });
})();
