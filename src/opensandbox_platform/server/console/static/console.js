// The OpenSandbox console: the sandbox list (#/) and a sandbox's page with its terminal (#/sandbox/ID).
// Everything a sandbox or a user controls (ids, metadata, messages, logs, terminal output) is put into
// the page as text (textContent, xterm.js): never as HTML. No inline script: the CSP forbids it.
"use strict";

(() => {
  const API = "/console/api";
  const view = document.getElementById("view");
  let session = null;
  let refreshTimer = null;
  let resourceTimer = null;
  let openTerminal = null; // {term, socket, onResize}

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
    }
    return node;
  }

  // The console's API: JSON, or with asText the diagnostics' plain text (errors are JSON either way).
  async function call(path, options, asText) {
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (init.method && init.method !== "GET") init.headers["X-Console-CSRF"] = session ? session.csrf : "";
    const response = await fetch(API + path, init);
    if (response.status === 401) {
      location.assign("/console/login");
      throw new Error("not logged in");
    }
    if (asText && response.ok) return response.text();
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) throw new Error((body && body.message) || response.statusText);
    return body;
  }

  function when(value) {
    return value ? new Date(value).toLocaleString() : "never";
  }

  function metadataText(metadata) {
    return Object.entries(metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  }

  function stopTimers() {
    if (refreshTimer) clearInterval(refreshTimer);
    if (resourceTimer) clearInterval(resourceTimer);
    refreshTimer = resourceTimer = null;
    if (openTerminal) {
      openTerminal.socket.close();
      openTerminal.term.dispose();
      window.removeEventListener("resize", openTerminal.onResize);
      openTerminal = null;
    }
  }

  // -- the list -----------------------------------------------------------------------------

  const listState = { state: "", metadata: "", page: 1 };

  function renderList() {
    const stateSelect = el("select", { id: "state-filter" },
      ...["", "Pending", "Running", "Paused", "Stopping", "Terminated", "Failed"].map(
        (s) => el("option", { value: s }, s || "any state")));
    stateSelect.value = listState.state;
    const metadataInput = el("input", { id: "metadata-filter", placeholder: "metadata k=v&k2=v2", value: listState.metadata });
    const apply = () => { listState.state = stateSelect.value; listState.metadata = metadataInput.value.trim(); listState.page = 1; load(); };
    stateSelect.addEventListener("change", apply);
    metadataInput.addEventListener("change", apply);
    const body = el("tbody", { id: "sandboxes" });
    const status = el("span", { id: "list-status" });
    const prev = el("button", { type: "button", onclick: () => { listState.page -= 1; load(); } }, "Previous");
    const next = el("button", { type: "button", onclick: () => { listState.page += 1; load(); } }, "Next");
    view.replaceChildren(
      el("h2", {}, "Sandboxes"),
      el("div", { class: "filters" }, stateSelect, metadataInput, status),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Id", "State", "Image", "Created", "Expires", "Metadata"].map((h) => el("th", {}, h)))), body),
      el("div", { class: "pager" }, prev, el("span", { id: "page" }), next),
    );

    async function load() {
      const query = new URLSearchParams({ page: String(listState.page), pageSize: "20" });
      if (listState.state) query.append("state", listState.state);
      if (listState.metadata) query.set("metadata", listState.metadata);
      try {
        const page = await call(`/sandboxes?${query}`);
        body.replaceChildren(...page.items.map((s) => el("tr", { "data-id": s.id },
          el("td", { class: "id" }, el("a", { href: `#/sandbox/${encodeURIComponent(s.id)}` }, s.id)),
          el("td", {}, el("span", { class: `state ${s.status.state}` }, s.status.state)),
          el("td", {}, s.image && s.image.uri),
          el("td", {}, when(s.createdAt)),
          el("td", {}, when(s.expiresAt)),
          el("td", {}, metadataText(s.metadata)),
        )));
        const info = page.pagination;
        document.getElementById("page").textContent = `page ${info.page} of ${Math.max(info.totalPages, 1)} (${info.totalItems} sandboxes)`;
        prev.disabled = info.page <= 1;
        next.disabled = !info.hasNextPage;
        status.textContent = "";
      } catch (err) {
        status.textContent = err.message;
        status.className = "error";
      }
    }
    load();
    refreshTimer = setInterval(load, 5000);
  }

  // -- one sandbox --------------------------------------------------------------------------

  function renderSandbox(id) {
    const details = el("dl", { id: "details" });
    const message = el("p", { id: "sandbox-message" });
    const termBox = el("div", { id: "terminal", hidden: "" });
    const renew = (seconds) => async () => {
      try {
        const out = await call(`/sandboxes/${encodeURIComponent(id)}/renew`, {
          method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ seconds }),
        });
        message.textContent = `Renewed: expires ${when(out.expiresAt)}`;
        message.className = "";
        load();
      } catch (err) {
        message.textContent = err.message;
        message.className = "error";
      }
    };
    const chart = el("canvas", { id: "resources-chart", width: "600", height: "120" });
    const samples = [];
    async function sampleResources() {
      try {
        const r = await call(`/sandboxes/${encodeURIComponent(id)}/resources`);
        samples.push(r);
        if (samples.length > 60) samples.shift();
        document.getElementById("resources-text").textContent =
          `CPU (blue) ${r.cpu_used_pct.toFixed(1)}% of ${r.cpu_count} · memory (orange) ${r.mem_used_mib.toFixed(0)} of ${r.mem_total_mib.toFixed(0)} MiB`;
        drawChart(chart, samples);
      } catch (err) {
        document.getElementById("resources-text").textContent = err.message;
      }
    }
    const files = fileBrowser(id, message);
    const endpoints = endpointsPanel(id);
    const diagnostics = diagnosticsPanel(id);
    const termButton = el("button", { type: "button", id: "open-terminal" }, "Open terminal");
    termButton.addEventListener("click", () => { termButton.disabled = true; startTerminal(id, termBox, message); });
    if (!session.terminal) {
      termButton.disabled = true;
      termButton.title = session.terminalMissing || "the terminal is off (console.terminal)";
    }
    view.replaceChildren(
      el("p", {}, el("a", { href: "#/" }, "← all sandboxes")),
      el("h2", {}, "Sandbox ", el("span", { class: "id" }, id)),
      details,
      el("div", { class: "actions" },
        el("button", { type: "button", id: "renew-10m", onclick: renew(600) }, "Expire in 10 min"),
        el("button", { type: "button", id: "renew-1h", onclick: renew(3600) }, "Expire in 1 h"),
        termButton),
      message,
      termBox,
      el("h3", {}, "Resources"),
      el("p", { id: "resources-text" }, "…"),
      chart,
      el("h3", {}, "Files"),
      files.box,
      el("h3", { id: "endpoints-heading" }, "Endpoints"),
      endpoints.box,
      el("h3", {}, "Diagnostics"),
      diagnostics.box,
    );
    files.open("/");
    endpoints.load();
    diagnostics.load();
    sampleResources();
    resourceTimer = setInterval(sampleResources, 2000);

    async function load() {
      try {
        const s = await call(`/sandboxes/${encodeURIComponent(id)}`);
        const rows = [
          ["State", el("span", { class: `state ${s.status.state}`, id: "sandbox-state" }, s.status.state)],
          ["Reason", [s.status.reason, s.status.message].filter(Boolean).join(": ")],
          ["Image", s.image && s.image.uri],
          ["Entrypoint", (s.entrypoint || []).join(" ")],
          ["Created", when(s.createdAt)],
          ["Expires", el("span", { id: "sandbox-expires" }, when(s.expiresAt))],
          ["Metadata", metadataText(s.metadata)],
        ];
        details.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
      } catch (err) {
        message.textContent = err.message;
        message.className = "error";
      }
    }
    load();
    refreshTimer = setInterval(load, 5000);
  }

  // CPU (blue) and memory (orange) in percent, the last 60 samples (2 minutes).
  function drawChart(canvas, samples) {
    const g = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    g.clearRect(0, 0, w, h);
    g.strokeStyle = "#e3e6ea";
    for (const pct of [0, 50, 100]) { g.beginPath(); g.moveTo(0, h - pct * h / 100); g.lineTo(w, h - pct * h / 100); g.stroke(); }
    const line = (color, value) => {
      g.strokeStyle = color;
      g.beginPath();
      samples.forEach((s, i) => {
        const x = (i / 59) * w, y = h - Math.max(0, Math.min(100, value(s))) * h / 100;
        if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
      });
      g.stroke();
      const last = samples.length - 1; // the newest sample as a dot (one sample alone makes no line)
      g.fillStyle = color;
      g.beginPath();
      g.arc((last / 59) * w, h - Math.max(0, Math.min(100, value(samples[last]))) * h / 100, 3, 0, 2 * Math.PI);
      g.fill();
    };
    line("#2a6fdb", (s) => s.cpu_used_pct);
    line("#e07b00", (s) => (s.mem_total_mib ? (100 * s.mem_used_mib) / s.mem_total_mib : 0));
  }

  // A directory at a time: entries (directories open, files download), and an upload into it.
  function fileBrowser(id, message) {
    const base = `${API}/sandboxes/${encodeURIComponent(id)}/files`;
    const pathInput = el("input", { id: "files-path", value: "/", size: "50" });
    const body = el("tbody", { id: "files" });
    const picker = el("input", { type: "file", id: "upload-file" });
    const box = el("div", { class: "files" },
      el("div", { class: "filters" }, pathInput,
        el("button", { type: "button", id: "files-go", onclick: () => open(pathInput.value) }, "List"),
        el("button", { type: "button", onclick: () => open(parent(pathInput.value)) }, "Up"),
        picker, el("button", { type: "button", id: "upload", onclick: () => upload() }, "Upload here")),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Name", "Type", "Size", "Modified"].map((h) => el("th", {}, h)))), body));
    const parent = (path) => path.replace(/\/+$/, "").replace(/\/[^/]*$/, "") || "/";
    const join = (dir, name) => (dir.endsWith("/") ? dir : dir + "/") + name;

    async function open(path) {
      pathInput.value = path;
      try {
        const listing = await call(`/sandboxes/${encodeURIComponent(id)}/files?${new URLSearchParams({ path })}`);
        body.replaceChildren(...listing.entries.map((e) => {
          const name = e.path.split("/").pop();
          const link = e.type === "directory"
            ? el("a", { href: "#", class: "dir", onclick: (ev) => { ev.preventDefault(); open(e.path); } }, name + "/")
            : e.type === "file"
              ? el("a", { href: `${base}/download?${new URLSearchParams({ path: e.path })}`, download: name, class: "file" }, name)
              : el("span", {}, name);
          return el("tr", { "data-path": e.path }, el("td", {}, link), el("td", {}, e.type), el("td", {}, e.size == null ? "" : e.size), el("td", {}, when(e.modifiedAt)));
        }));
      } catch (err) {
        message.textContent = err.message;
        message.className = "error";
      }
    }

    async function upload() {
      const file = picker.files[0];
      if (!file) return;
      const target = join(pathInput.value, file.name);
      try {
        await call(`/sandboxes/${encodeURIComponent(id)}/files/upload?${new URLSearchParams({ path: target })}`, { method: "POST", body: file });
        message.textContent = `Uploaded ${target}`;
        message.className = "";
        open(pathInput.value);
      } catch (err) {
        message.textContent = err.message;
        message.className = "error";
      }
    }
    return { box, open };
  }

  // Where a port of the sandbox is reached: execd's at once, any port on demand (direct, through the
  // server, or a signed URL through the server). An answer's headers are credentials (execd's access
  // token, a secureAccess token): the server sends their names only, and so the page shows.
  const EXECD_PORT = 44772;
  const SIGNED_FOR = [["", "not signed"], ["900", "signed, 15 min"], ["3600", "signed, 1 h"], ["86400", "signed, 1 day"]];

  function endpointsPanel(id) {
    const body = el("tbody", { id: "endpoints" });
    const status = el("span", { id: "endpoint-status" });
    const port = el("input", { id: "endpoint-port", type: "number", min: "1", max: "65535", value: String(EXECD_PORT) });
    const viaServer = el("input", { id: "endpoint-proxy", type: "checkbox" });
    const signed = el("select", { id: "endpoint-signed" }, ...SIGNED_FOR.map(([v, text]) => el("option", { value: v }, text)));

    async function resolve(number, proxied, expiresIn) {
      if (!/^[0-9]{1,5}$/.test(String(number))) {
        status.textContent = "a port is a number from 1 to 65535";
        status.className = "error";
        return;
      }
      const query = new URLSearchParams({ use_server_proxy: String(proxied) });
      if (expiresIn) query.set("expiresIn", expiresIn);
      try {
        const found = await call(`/sandboxes/${encodeURIComponent(id)}/endpoints/${number}?${query}`);
        const route = found.expiresAt ? "signed" : proxied ? "server" : "direct";
        const routeText = found.expiresAt ? `signed, valid until ${when(found.expiresAt)}` : proxied ? "through the server" : "direct";
        const headers = found.headerNames.map((name) => `${name}: (value not shown)`).join(", ") || "none";
        body.append(el("tr", { "data-port": String(found.port), "data-route": route },
          el("td", {}, found.port), el("td", {}, routeText), el("td", { class: "endpoint" }, found.endpoint), el("td", {}, headers)));
        status.textContent = "";
      } catch (err) {
        status.textContent = err.message;
        status.className = "error";
      }
    }

    const box = el("div", { class: "endpoints" },
      el("div", { class: "filters" },
        el("label", {}, "Port ", port), el("label", {}, viaServer, " through the server"), signed,
        el("button", { type: "button", id: "endpoint-resolve", onclick: () => resolve(port.value, viaServer.checked, signed.value) }, "Resolve"),
        status),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Port", "Route", "Endpoint", "Headers to send"].map((h) => el("th", {}, h)))), body));
    const load = async () => {
      await resolve(EXECD_PORT, false, "");
      await resolve(EXECD_PORT, true, "");
    };
    return { box, load };
  }

  // The sandbox's lifecycle events and the last lines of its output, read when asked (Refresh).
  function diagnosticsPanel(id) {
    const base = `/sandboxes/${encodeURIComponent(id)}/diagnostics`;
    const tail = el("select", { id: "logs-tail" }, ...["50", "200", "1000"].map((n) => el("option", { value: n }, `last ${n} lines`)));
    tail.value = "200";
    const status = el("span", { id: "diagnostics-status" });
    const events = el("pre", { id: "events", class: "output" });
    const logs = el("pre", { id: "logs", class: "output" });

    async function load() {
      status.textContent = "loading…";
      status.className = "";
      try {
        const [eventText, logText] = await Promise.all([
          call(`${base}/events`, null, true), call(`${base}/logs?tail=${tail.value}`, null, true)]);
        events.textContent = eventText || "(no events)";
        logs.textContent = logText || "(no output)";
        logs.scrollTop = logs.scrollHeight; // the newest lines in view
        status.textContent = `read at ${new Date().toLocaleTimeString()}`;
      } catch (err) {
        status.textContent = err.message;
        status.className = "error";
      }
    }

    tail.addEventListener("change", load);
    const box = el("div", { class: "diagnostics" },
      el("div", { class: "filters" }, tail, el("button", { type: "button", id: "diagnostics-refresh", onclick: load }, "Refresh"), status),
      el("h4", {}, "Events"), events, el("h4", {}, "Logs"), logs);
    return { box, load };
  }

  // -- the terminal: execd's PTY protocol through the server ---------------------------------

  const STDIN = 0x00, STDOUT = 0x01, REPLAY = 0x03;

  function startTerminal(id, box, message) {
    box.hidden = false;
    const term = new window.Terminal({
      cursorBlink: true, scrollback: 5000, fontSize: 14, lineHeight: 1.15,
      // A sandbox's OSC 8 hyperlinks are not followed: a click never leaves the console.
      linkHandler: { activate: () => {} },
    });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    fit.fit();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${API}/sandboxes/${encodeURIComponent(id)}/terminal`);
    socket.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    const sendResize = () => {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    };
    const pending = []; // what is typed before the socket is open is sent once it is
    socket.addEventListener("open", () => {
      sendResize();
      for (const frame of pending.splice(0)) socket.send(frame);
      term.focus();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") {
        const control = JSON.parse(event.data);
        if (control.type === "exit") term.write(`\r\n[the shell exited with ${Number(control.exit_code)}]\r\n`);
        return;
      }
      const bytes = new Uint8Array(event.data);
      if (bytes[0] === STDOUT) term.write(bytes.subarray(1));
      else if (bytes[0] === REPLAY) term.write(bytes.subarray(9));
    });
    socket.addEventListener("close", (event) => {
      message.textContent = `Terminal closed (${event.code}${event.reason ? ": " + event.reason : ""})`;
    });
    term.onData((data) => {
      const input = encoder.encode(data);
      const frame = new Uint8Array(input.length + 1);
      frame[0] = STDIN;
      frame.set(input, 1);
      if (socket.readyState === WebSocket.OPEN) socket.send(frame);
      else if (socket.readyState === WebSocket.CONNECTING && pending.length < 1000) pending.push(frame);
    });
    term.onResize(sendResize);
    const onResize = () => fit.fit();
    window.addEventListener("resize", onResize);
    openTerminal = { term, socket, onResize };
    window.consoleTerminal = term; // for the browser tests: the screen's text is term.buffer's
  }

  // -- routing ------------------------------------------------------------------------------

  function route() {
    stopTimers();
    const match = location.hash.match(/^#\/sandbox\/(.+)$/);
    if (match) renderSandbox(decodeURIComponent(match[1]));
    else renderList();
  }

  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/console/logout", { method: "POST", credentials: "same-origin", headers: { "X-Console-CSRF": session ? session.csrf : "" } })
      .catch(() => {});
    location.assign("/console/login");
  });

  (async () => {
    session = await call("/session");
    document.getElementById("runtime").textContent = `runtime: ${session.runtime}`;
    if (session.open) document.getElementById("logout").hidden = true;
    window.addEventListener("hashchange", route);
    route();
  })().catch((err) => { view.replaceChildren(el("p", { class: "error" }, err.message)); });
})();
