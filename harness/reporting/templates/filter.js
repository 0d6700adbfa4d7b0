(function () {
  "use strict";
  var form = document.getElementById("filter");
  var table = document.getElementById("all-examples");
  if (!form || !table || !table.tBodies.length) return;
  var query = form.elements.namedItem("q");
  var show = form.elements.namedItem("show");
  var count = document.getElementById("filter-count");
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  function keep(row, text, mode) {
    if (text && row.textContent.toLowerCase().indexOf(text) === -1) return false;
    if (mode === "all") return true;
    var parts = mode.split(":");
    if (parts[0] === "flag") {
      return (" " + (row.getAttribute("data-flags") || "") + " ").indexOf(" " + parts[1] + " ") !== -1;
    }
    return row.getAttribute("data-s" + parts[1]) === parts[0];
  }
  function apply() {
    var text = query.value.trim().toLowerCase(), mode = show.value, shown = 0;
    rows.forEach(function (row) {
      var ok = keep(row, text, mode);
      row.hidden = !ok;
      if (ok) shown += 1;
    });
    count.textContent = shown + " of " + rows.length + " examples shown";
  }
  form.addEventListener("input", apply);
  form.addEventListener("change", apply);
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  form.hidden = false;
  apply();
})();
