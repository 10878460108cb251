// The interactive permutation-graph page: zoom and pan, click or hover a box for its spaces,
// search a parameter for its spaces and why they are or are not free. Reads only the JSON
// embedded in the page; loads nothing.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("graph-data").textContent);
  const canvas = document.getElementById("canvas");
  const panel = document.getElementById("panel");
  const tip = document.getElementById("tip");
  const search = document.getElementById("search");
  const results = document.getElementById("results");
  const foldBox = document.getElementById("fold");
  const colourSel = document.getElementById("colour");
  const views = {};
  DATA.views.forEach(function (v) { views[v] = document.getElementById("view-" + v); });
  let current = DATA.default_view;
  let vb = null;
  let selected = [];
  let hitSpaces = [];
  let selectedSpaces = [];
  const paramNames = Object.keys(DATA.params).sort();

  function el(tag, attrs) {
    const node = document.createElement(tag);
    for (const k in (attrs || {})) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else if (k === "onclick") node.addEventListener("click", attrs[k]);
      else node.setAttribute(k, attrs[k]);
    }
    for (let i = 2; i < arguments.length; i++) {
      const c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function spaceLink(id) {
    return el("a", { text: "S" + id, onclick: function () { showSpace(id); } });
  }
  function paramLink(name) {
    return el("a", { text: name, onclick: function () { showParam(name); } });
  }
  function why(text) {
    return el("div", { cls: "why " + (text.indexOf("free") === 0 ? "free" : "fixed"), text: text });
  }

  // -- zoom and pan (the SVG's viewBox) ------------------------------------------------------
  function svg() { return views[current]; }
  function size() { return { w: +svg().dataset.w, h: +svg().dataset.h }; }
  function apply() { svg().setAttribute("viewBox", vb.x + " " + vb.y + " " + vb.w + " " + vb.h); }
  function fit() {
    const s = size(), r = canvas.getBoundingClientRect();
    const k = Math.max(s.w / r.width, s.h / r.height);
    vb = { x: 0, y: 0, w: r.width * k, h: r.height * k };
    apply();
  }
  function fitWidth() {
    // the whole width in view, magnified at most 1.6 times (a small model stays readable)
    const s = size(), r = canvas.getBoundingClientRect();
    const k = Math.max(s.w / r.width, 1 / 1.6);
    vb = { x: 0, y: 0, w: s.w, h: r.height * k };
    apply();
  }
  function toSvg(cx, cy) {
    const r = canvas.getBoundingClientRect();
    return { x: vb.x + (cx - r.left) * vb.w / r.width, y: vb.y + (cy - r.top) * vb.h / r.height };
  }
  function zoom(factor, cx, cy) {
    const p = toSvg(cx, cy);
    vb = { x: p.x - (p.x - vb.x) * factor, y: p.y - (p.y - vb.y) * factor, w: vb.w * factor, h: vb.h * factor };
    apply();
  }
  function centreOn(box) {
    // pan (zooming out only if it does not fit) so that the box is in view
    if (!box) return;
    const inside = box[0] >= vb.x && box[1] >= vb.y && box[0] + box[2] <= vb.x + vb.w && box[1] + box[3] <= vb.y + vb.h;
    if (inside) return;
    let w = vb.w, h = vb.h;
    const k = Math.max(1, box[2] / (0.9 * w), box[3] / (0.9 * h));
    w *= k; h *= k;
    vb = { x: box[0] + box[2] / 2 - w / 2, y: box[1] + box[3] / 2 - h / 2, w: w, h: h };
    apply();
  }
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom(Math.exp(e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)), e.clientX, e.clientY);
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("pointerdown", function (e) {
    drag = { x: e.clientX, y: e.clientY, vb: Object.assign({}, vb), moved: false };
  });
  window.addEventListener("pointermove", function (e) {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 4) { drag.moved = true; canvas.classList.add("dragging"); }
    if (!drag.moved) return;
    const r = canvas.getBoundingClientRect();
    vb = Object.assign({}, drag.vb, { x: drag.vb.x - dx * drag.vb.w / r.width, y: drag.vb.y - dy * drag.vb.h / r.height });
    apply();
  });
  window.addEventListener("pointerup", function (e) {
    const was = drag;
    drag = null;
    canvas.classList.remove("dragging");
    if (was && !was.moved) {
      const key = e.target.getAttribute && e.target.getAttribute("data-key");
      if (key) showItem(key);
    }
  });
  document.getElementById("zin").addEventListener("click", function () {
    const r = canvas.getBoundingClientRect(); zoom(1 / 1.4, r.left + r.width / 2, r.top + r.height / 2);
  });
  document.getElementById("zout").addEventListener("click", function () {
    const r = canvas.getBoundingClientRect(); zoom(1.4, r.left + r.width / 2, r.top + r.height / 2);
  });
  document.getElementById("fit").addEventListener("click", fit);

  // -- highlighting ------------------------------------------------------------------------
  function mark(keys, cls) {
    svg().querySelectorAll("rect." + cls).forEach(function (r) { r.classList.remove(cls); });
    keys.forEach(function (k) {
      svg().querySelectorAll('rect[data-key="' + k + '"]').forEach(function (r) {
        if (r.dataset.role !== "cell") r.classList.add(cls);
      });
    });
  }
  function keysOf(spaces) {
    const out = [];
    spaces.forEach(function (s) {
      const k = DATA.spaces[s].element[current];
      if (k && out.indexOf(k) < 0) out.push(k);
    });
    return out;
  }
  function boxOf(key) { return (DATA.boxes[current][key] || [])[0]; }

  // -- hover -------------------------------------------------------------------------------
  canvas.addEventListener("mousemove", function (e) {
    const key = e.target.getAttribute && e.target.getAttribute("data-key");
    if (!key || drag) { tip.style.display = "none"; return; }
    const it = DATA.items[current][key];
    const lines = [it.title];
    it.spaces.forEach(function (s) { lines.push("S" + s + ": " + DATA.spaces[s].why); });
    if (it.copies.length > 1) lines.push("\u00d7" + it.copies.length + " identical blocks (click for all)");
    tip.textContent = lines.join("\n");
    tip.style.whiteSpace = "pre-wrap";
    tip.style.display = "block";
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - 440) + "px";
    tip.style.top = (e.clientY + 14) + "px";
  });
  canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });

  // -- the side panel ------------------------------------------------------------------------
  function spaceCard(id) {
    const s = DATA.spaces[id];
    const card = el("div", { cls: "card" });
    card.appendChild(el("h3", {}, spaceLink(id), " \u00b7 " + s.structure));
    card.appendChild(el("div", { cls: "muted mono", text: s.title }));
    card.appendChild(why(s.why));
    if (s.head !== null) {
      const p = el("div", {}, "blocks ordered by head space ");
      p.appendChild(spaceLink(s.head));
      card.appendChild(p);
    }
    if (s.ties.length) {
      const p = el("div", {}, "its block permutation moves ");
      s.ties.forEach(function (t, i) { if (i) p.appendChild(document.createTextNode(", ")); p.appendChild(spaceLink(t)); });
      card.appendChild(p);
    }
    if (s.match) {
      const m = s.match;
      const kv = el("div", { cls: "kv" },
        el("div", { text: "merged by" }), el("div", { text: m.method }),
        el("div", { text: "matched corr." }), el("div", { text: m.similarity === null ? "n/a (no statistics)" : m.similarity.toFixed(3) }),
        el("div", { text: "zipped within" }), el("div", { text: m.within + " units (same model)" }),
        el("div", { text: "merged units" }), el("div", { text: String(m.merged) }),
        el("div", { text: "dead units" }), el("div", { text: String(m.dead) }));
      card.appendChild(kv);
    }
    if (s.members.length) {
      const t = el("table", {}, el("tr", {}, el("th", { text: "parameter" }), el("th", { text: "axis" }),
        el("th", { text: "role" }), el("th", { text: "layout" })));
      s.members.forEach(function (m) {
        t.appendChild(el("tr", {}, el("td", { cls: "p" }, paramLink(m.param)), el("td", { text: String(m.axis) }),
          el("td", { text: m.role }), el("td", { cls: "p", text: m.layout })));
      });
      card.appendChild(t);
    } else {
      card.appendChild(el("div", { cls: "muted", text: "no parameter carries this space's units directly" }));
    }
    if (s.taps.length) {
      const t = el("table", {}, el("tr", {}, el("th", { text: "tap" }), el("th", { text: "node" }),
        el("th", { text: "axis" }), el("th", { text: "layout" })));
      s.taps.forEach(function (tp) {
        t.appendChild(el("tr", {}, el("td", { text: tp.dir }), el("td", { cls: "p", text: tp.node + (tp.proj ? " via " + tp.proj : "") }),
          el("td", { text: String(tp.axis) }), el("td", { cls: "p", text: tp.layout })));
      });
      card.appendChild(el("div", { cls: "muted", text: "taps: where the statistics read this space's activations" }));
      card.appendChild(t);
    }
    return card;
  }
  function clear() { panel.textContent = ""; }
  function setHash(h) { try { history.replaceState(null, "", h); } catch (e) { /* file:// in some browsers */ } }

  function showItem(key, focus) {
    const it = DATA.items[current][key];
    clear();
    panel.appendChild(el("h2", { text: it.title }));
    panel.appendChild(el("div", { cls: "muted", text: it.kind_text }));
    if (it.kind === "barrier") panel.appendChild(why("fixed: " + it.note));
    else if (it.note) panel.appendChild(el("div", { cls: "mono", text: it.note }));
    if (it.copies.length > 1) {
      const p = el("div", { cls: "card" }, el("div", { text: "\u00d7" + it.copies.length + " identical blocks drawn once:" }));
      it.copies.forEach(function (spaces, i) {
        const row = el("div", { cls: "mono" }, (it.blocks[i] || "") + ": ");
        spaces.forEach(function (s, j) { if (j) row.appendChild(document.createTextNode(", ")); row.appendChild(spaceLink(s)); });
        p.appendChild(row);
      });
      panel.appendChild(p);
    }
    if (it.reads.length || it.writes.length) {
      const p = el("div", {});
      if (it.reads.length) { p.appendChild(document.createTextNode("reads ")); it.reads.forEach(function (s) { p.appendChild(spaceLink(s)); p.appendChild(document.createTextNode(" ")); }); }
      if (it.writes.length) { p.appendChild(document.createTextNode(" writes ")); it.writes.forEach(function (s) { p.appendChild(spaceLink(s)); p.appendChild(document.createTextNode(" ")); }); }
      panel.appendChild(p);
    }
    it.spaces.forEach(function (s) { panel.appendChild(spaceCard(s)); });
    selectedSpaces = it.spaces.slice();
    selected = [key];
    hitSpaces = [];
    mark(selected, "sel");
    mark([], "hit");
    if (focus) centreOn(boxOf(key));
  }
  function showSpace(id) {
    const key = DATA.spaces[id].element[current];
    showItem(key, true);
    const cards = panel.querySelectorAll(".card h3 a");
    cards.forEach(function (a) { if (a.textContent === "S" + id) a.closest(".card").scrollIntoView(); });
    setHash("#S" + id);
  }
  function showParam(name) {
    const p = DATA.params[name];
    if (!p) return;
    clear();
    panel.appendChild(el("h2", { text: name }));
    if (p.canonical !== name) panel.appendChild(el("div", { cls: "muted" }, "tied: the same tensor as ", paramLink(p.canonical)));
    if (p.shape) panel.appendChild(el("div", { cls: "muted mono", text: "shape [" + p.shape.join(", ") + "]" }));
    panel.appendChild(why(p.why));
    const spaces = [];
    p.axes.forEach(function (a) {
      const card = el("div", { cls: "card" }, el("div", { cls: "mono", text: "axis " + a.axis + " (" + a.role + "), layout " + a.layout }));
      a.spaces.forEach(function (s) {
        spaces.push(s);
        const sp = DATA.spaces[s];
        card.appendChild(el("div", {}, spaceLink(s), " \u00b7 " + sp.structure + " \u00b7 ", el("span", { cls: "mono", text: sp.title })));
        card.appendChild(why(sp.why));
      });
      panel.appendChild(card);
    });
    if (!p.axes.length) panel.appendChild(el("div", { cls: "muted", text: "no axis of this tensor is governed by a space" }));
    hitSpaces = spaces;
    const keys = keysOf(spaces);
    mark(keys, "hit");
    mark([], "sel");
    if (keys.length) centreOn(boxOf(keys[0]));
    setHash("#param=" + encodeURIComponent(name));
  }
  function help() {
    clear();
    panel.appendChild(el("h2", { text: DATA.title }));
    panel.appendChild(el("div", { cls: "muted", text: DATA.subtitle }));
    const ul = el("ul", { cls: "help" },
      el("li", { text: "Scroll to zoom, drag to pan, \u201cfit\u201d to see everything." }),
      el("li", { text: "Click a box or band: its spaces, their members (parameter, axis, layout, role), taps, and why each is free or fixed." }),
      el("li", { text: "Type a parameter name in the search box: its spaces and why they are or are not free; the boxes holding them are outlined." }),
      el("li", { text: "Space ids (S12) are the ids of the text summary and the JSON; links like #param=NAME or #S12 open here directly." }));
    panel.appendChild(ul);
    if (DATA.barriers.length) {
      panel.appendChild(el("h3", { text: "barriers" }));
      DATA.barriers.forEach(function (b) { panel.appendChild(el("div", { cls: "mono", text: b.node + " (" + b.op + "): " + b.reason })); });
    }
    const fixed = DATA.spaces.filter(function (s) { return !s.free; });
    if (fixed.length) {
      panel.appendChild(el("h3", { text: fixed.length + " spaces not free" }));
      fixed.forEach(function (s) { panel.appendChild(el("div", {}, spaceLink(s.id), " " + s.why)); });
    }
  }

  // -- search --------------------------------------------------------------------------------
  let hits = [], active = 0;
  function renderResults() {
    results.textContent = "";
    hits.forEach(function (name, i) {
      const p = DATA.params[name];
      const li = el("li", { cls: i === active ? "active" : "" }, name,
        el("span", { cls: "s", text: p.axes.map(function (a) { return a.spaces.map(function (s) { return "S" + s; }).join("+"); }).join(" ") || "-" }));
      li.addEventListener("mousedown", function (e) { e.preventDefault(); choose(name); });
      results.appendChild(li);
    });
    results.style.display = hits.length ? "block" : "none";
  }
  function choose(name) {
    results.style.display = "none";
    search.value = name;
    showParam(name);
  }
  search.addEventListener("input", function () {
    const q = search.value.trim().toLowerCase();
    hits = q ? paramNames.filter(function (n) { return n.toLowerCase().indexOf(q) >= 0; }).slice(0, 80) : [];
    active = 0;
    renderResults();
  });
  search.addEventListener("keydown", function (e) {
    if (e.key === "ArrowDown") { active = Math.min(active + 1, hits.length - 1); renderResults(); e.preventDefault(); }
    else if (e.key === "ArrowUp") { active = Math.max(active - 1, 0); renderResults(); e.preventDefault(); }
    else if (e.key === "Enter") {
      const q = search.value.trim();
      const m = /^S(\d+)$/i.exec(q);
      if (m && DATA.spaces[+m[1]]) { results.style.display = "none"; showSpace(+m[1]); }
      else if (DATA.params[q]) choose(q);
      else if (hits.length) choose(hits[active]);
    } else if (e.key === "Escape") { results.style.display = "none"; }
  });
  search.addEventListener("blur", function () { results.style.display = "none"; });

  // -- views and colouring -----------------------------------------------------------------
  function show(view) {
    const box = vb ? { x: vb.x, y: vb.y } : null;
    DATA.views.forEach(function (v) { views[v].style.display = v === view ? "block" : "none"; });
    current = view;
    fitWidth();
    if (selected.length) {  // the same spaces, in the boxes of the new view
      selected = keysOf(selectedSpaces);
      mark(selected, "sel");
    }
    if (hitSpaces.length) mark(keysOf(hitSpaces), "hit");
    return box;
  }
  if (foldBox) {
    foldBox.checked = current === "folded";
    foldBox.addEventListener("change", function () { show(foldBox.checked ? "folded" : "full"); });
  }
  function quality(sim) {
    const t = Math.max(0, Math.min(1, sim));
    const a = t < 0.5 ? [244, 199, 195] : [255, 242, 179], b = t < 0.5 ? [255, 242, 179] : [183, 225, 181];
    const u = t < 0.5 ? t / 0.5 : (t - 0.5) / 0.5;
    return "rgb(" + a.map(function (c, i) { return Math.round(c + (b[i] - c) * u); }).join(",") + ")";
  }
  if (colourSel) {
    colourSel.addEventListener("change", function () {
      DATA.views.forEach(function (v) {
        views[v].querySelectorAll('rect[data-role="box"]').forEach(function (r) {
          if (!r.dataset.fill) r.dataset.fill = r.getAttribute("fill");
          const it = DATA.items[current][r.dataset.key];
          const sims = it.spaces.map(function (s) { return DATA.spaces[s].match; })
            .filter(function (m) { return m && m.similarity !== null; }).map(function (m) { return m.similarity; });
          const on = colourSel.value === "quality" && sims.length;
          r.setAttribute("fill", on ? quality(sims.reduce(function (a, b) { return a + b; }, 0) / sims.length) : r.dataset.fill);
        });
      });
    });
  }

  // the address can open the page in a state: #S12, #param=NAME, #q=TEXT, view=full, colour=quality
  const opts = {};
  (location.hash || "").slice(1).split("&").forEach(function (part) {
    if (!part) return;
    const i = part.indexOf("=");
    if (i < 0) opts[part] = true;
    else opts[part.slice(0, i)] = decodeURIComponent(part.slice(i + 1));
  });
  if (opts.view && views[opts.view]) current = opts.view;
  help();
  show(current);
  if (foldBox) foldBox.checked = current === "folded";
  if (opts.colour && colourSel) { colourSel.value = opts.colour; colourSel.dispatchEvent(new Event("change")); }
  const space = Object.keys(opts).filter(function (k) { return /^S\d+$/.test(k); })[0];
  if (opts.param && DATA.params[opts.param]) showParam(opts.param);
  else if (space && DATA.spaces[+space.slice(1)]) showSpace(+space.slice(1));
  if (opts.q) { search.value = opts.q; search.dispatchEvent(new Event("input")); }
  window.addEventListener("resize", function () {
    if (!vb) return;
    const r = canvas.getBoundingClientRect();
    vb.h = vb.w * r.height / r.width;
    apply();
  });
})();
