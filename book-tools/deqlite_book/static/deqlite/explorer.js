/* deqlite book: figures built by deqlite.viz.Explorer with several parameters carry one
   slider per parameter. Plotly sliders are independent, so each one only records its
   position; this script applies the precomputed combination they select together, stored
   in layout.meta.deqlite_explorer = {sizes: [n per slider], steps: [[restyle, relayout], ...]}
   in row-major order (the first slider varies slowest). Offline: no network, no CDN. */
(function () {
  "use strict";
  function wire(gd) {
    if (gd._deqliteExplorer || !gd.layout || !gd.layout.meta || !gd.layout.meta.deqlite_explorer) return;
    if (typeof gd.on !== "function") return;
    var table = gd.layout.meta.deqlite_explorer;
    gd._deqliteExplorer = true;
    var pos = (gd.layout.sliders || []).map(function (s) { return s.active || 0; });
    gd.on("plotly_sliderchange", function (ev) {
      var idx = ev.slider && typeof ev.slider._index === "number" ? ev.slider._index : -1;
      if (idx < 0) return;
      var steps = (gd.layout.sliders[idx] || {}).steps || [];
      var k = ev.step && typeof ev.step._index === "number" ? ev.step._index : -1;
      if (k < 0) for (var j = 0; j < steps.length; j++) if (steps[j].label === ev.step.label) k = j;
      if (k < 0) return;
      pos[idx] = k;
      var flat = 0;
      for (var i = 0; i < table.sizes.length; i++) flat = flat * table.sizes[i] + (pos[i] || 0);
      var step = table.steps[flat];
      if (step) window.Plotly.update(gd, step[0], step[1]);
    });
  }
  function scan() {
    var divs = document.querySelectorAll(".plotly-graph-div");
    for (var i = 0; i < divs.length; i++) wire(divs[i]);
  }
  function start() {
    scan();
    var tries = 0;
    var timer = setInterval(function () { scan(); if (++tries > 40) clearInterval(timer); }, 250);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
