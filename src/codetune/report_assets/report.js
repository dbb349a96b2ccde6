// The filters: vanilla JS over data- attributes; the rows themselves are server-rendered, escaped HTML.
(() => {
  const rows = Array.from(document.querySelectorAll(".sample"));
  const texts = rows.map((r) => r.textContent.toLowerCase());
  const buttons = Array.from(document.querySelectorAll(".controls button[data-filter]"));
  const suite = document.getElementById("suite");
  const search = document.getElementById("search");
  const shown = document.getElementById("shown");
  let filter = "all";
  function apply() {
    const q = search.value.trim().toLowerCase();
    let n = 0;
    rows.forEach((r, i) => {
      const ok = (filter === "all" || r.dataset[filter] === "1") &&
        (suite.value === "all" || r.dataset.suite === suite.value) && (!q || texts[i].includes(q));
      r.hidden = !ok;
      if (ok) n += 1;
    });
    shown.textContent = n + " of " + rows.length + " shown";
  }
  buttons.forEach((b) => b.addEventListener("click", () => {
    filter = b.dataset.filter;
    buttons.forEach((x) => x.classList.toggle("on", x === b));
    apply();
  }));
  suite.addEventListener("change", apply);
  search.addEventListener("input", apply);
  apply();
})();
