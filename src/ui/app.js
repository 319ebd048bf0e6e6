// shoal visualizer: renders the cluster view the manager streams over server-sent events.
// Read-only; no framework, no build step: this file is embedded in the binary.
"use strict";

const $ = (id) => document.getElementById(id);
let view = null;

function hue(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return h % 360;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") e.setAttribute("style", v);
    else e.dataset[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmtRate(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n));
}

function matches(q, ...fields) {
  return !q || fields.some((f) => f && f.toLowerCase().includes(q));
}

function render() {
  if (!view) return;
  const q = $("search").value.trim().toLowerCase();
  $("cluster").textContent = `${view.nodes.length} nodes · ${view.services.length} services`;
  const nodes = $("nodes");
  nodes.replaceChildren();
  for (const n of view.nodes) {
    const badges = el("div", {});
    if (n.manager_status) badges.append(el("span", { class: "badge" + (n.manager_status === "Leader" ? " leader" : "") }, n.manager_status));
    else badges.append(el("span", { class: "badge" }, n.role));
    badges.append(el("span", { class: "badge" + (n.status === "Down" ? " down" : "") }, n.status));
    badges.append(el("span", { class: "badge " + n.availability.toLowerCase() }, n.availability));
    const tasks = el("div", { class: "tasks" });
    let shown = 0;
    for (const t of n.tasks) {
      if (!matches(q, t.service, n.hostname)) continue;
      shown++;
      const health = t.health ? ` · ${t.health}` : "";
      tasks.append(
        el("div", { class: `task ${t.state} ${t.health || ""}`, style: `background: hsl(${hue(t.service)} 55% 42%)`, service: t.service, task: t.name },
          el("div", { class: "svc" }, t.name),
          el("div", {}, `${t.state}${health}`),
          el("div", {}, t.ips.join(", "))));
    }
    const card = el("article", { class: "node" + (n.status === "Down" ? " down" : ""), node: n.hostname },
      el("div", { class: "head" },
        el("div", { class: "name" }, n.hostname),
        el("div", { class: "meta" }, n.addr),
        badges),
      tasks);
    if (q && !shown && !matches(q, n.hostname)) card.classList.add("hidden");
    nodes.append(card);
  }
  const rows = $("service-rows");
  rows.replaceChildren();
  for (const s of view.services) {
    if (!matches(q, s.name)) continue;
    const m = s.mesh || {};
    rows.append(el("tr", { service: s.name },
      el("td", {}, el("span", { class: "badge", style: `background: hsl(${hue(s.name)} 55% 42%); color: #fff` }, s.name)),
      el("td", {}, s.mode),
      el("td", {}, `${s.running}/${s.desired}`),
      el("td", {}, s.published.join(", ") || "-"),
      el("td", {}, m.active_connections ?? "-"),
      el("td", {}, m.requests_per_second != null ? fmtRate(m.requests_per_second) : "-"),
      el("td", {}, m.bytes_per_second != null ? fmtRate(m.bytes_per_second) : "-"),
      el("td", {}, m.backends != null ? `${m.healthy_backends}/${m.backends}` : "-")));
  }
}

function connect() {
  const es = new EventSource("events");
  es.addEventListener("view", (ev) => {
    view = JSON.parse(ev.data);
    $("live").textContent = "live";
    $("live").classList.add("ok");
    render();
  });
  es.onerror = () => {
    $("live").textContent = "reconnecting…";
    $("live").classList.remove("ok");
  };
}

$("search").addEventListener("input", render);
const initial = new URLSearchParams(location.search).get("q");
if (initial) $("search").value = initial;
connect();
