"""The review controls of the outliers and duplicates pages: keep / relabel as ... / drop per painting, kept in the
browser while reviewing (``localStorage``, per page and content: a page written again with other paintings or
labels starts empty, the same page reopened keeps them) and exported as the ``decisions.csv`` that
``data.label_overrides`` reads (``row, path, head, decision, new_label``). Static HTML and a little JavaScript,
nothing fetched: the page works offline, straight from disk.
"""

from __future__ import annotations

import html

STYLE = (".review{margin-top:4px}.review button{font-size:11px;margin-right:2px}"
         ".review[data-decision=keep] .keep,.review[data-decision=drop] .drop,"
         ".review[data-decision=relabel] .relabel{background:#246;color:#fff}"
         "#reviewbar{position:sticky;top:0;background:#fff;padding:4px;border-bottom:1px solid #ccc}")

SCRIPT = """<script>
(() => {
  const key = 'crnn-art-review:' + document.body.dataset.page;
  let decisions = {};
  try { decisions = JSON.parse(localStorage.getItem(key) || '{}'); } catch (e) { decisions = {}; }
  const quote = s => /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  function render() {
    document.querySelectorAll('.review').forEach(el => {
      const d = decisions[el.dataset.row + '/' + el.dataset.head];
      el.dataset.decision = d ? d.decision : '';
      if (d && d.decision === 'relabel') el.querySelector('select').value = d.new_label;
    });
    document.getElementById('reviewcount').textContent = Object.keys(decisions).length;
  }
  function save() { localStorage.setItem(key, JSON.stringify(decisions)); render(); }
  document.querySelectorAll('.review').forEach(el => {
    const decide = decision => {
      if (decision === 'relabel' && !el.querySelector('select').value) return;  // no class chosen yet
      decisions[el.dataset.row + '/' + el.dataset.head] = {row: el.dataset.row, path: el.dataset.path,
        head: el.dataset.head, decision: decision,
        new_label: decision === 'relabel' ? el.querySelector('select').value : ''};
      save();
    };
    el.querySelectorAll('button[data-decision]').forEach(
      b => b.addEventListener('click', () => decide(b.dataset.decision)));
    el.querySelector('select').addEventListener('change', () => decide('relabel'));  // picking a class relabels
  });
  window.decisionsCsv = () => ['row,path,head,decision,new_label'].concat(Object.values(decisions)
    .sort((a, b) => (+a.row - +b.row) || a.head.localeCompare(b.head))
    .map(d => [d.row, quote(d.path), d.head, d.decision, quote(d.new_label)].join(','))).join('\\n') + '\\n';
  document.getElementById('export').addEventListener('click', () => {
    const link = document.createElement('a');
    link.href = URL.createObjectURL(new Blob([window.decisionsCsv()], {type: 'text/csv'}));
    link.download = 'decisions.csv';
    document.body.appendChild(link);
    link.click();
    link.remove();
  });
  document.getElementById('clear').addEventListener('click', () => { decisions = {}; save(); });
  render();
})();
</script>"""


def review_body(path, content: str) -> str:
    """The page's ``<body>`` tag, naming where decisions are kept: the page's path and a digest of its content."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    return f"<body data-page='{html.escape(str(Path(path).resolve()))}#{digest}'>"


def review_bar() -> str:
    """The bar at the top of a page: how many decisions, export, clear."""
    return ("<div id='reviewbar'><b><span id='reviewcount'>0</span></b> decisions (kept in this browser) "
            "<button id='export'>export decisions.csv</button> <button id='clear'>clear</button> "
            "<small>then train with --set data.label_overrides=decisions.csv</small></div>")


def review_controls(row: int, head: str, path: str, names: list[str], given: str, suggested: str) -> str:
    """keep / relabel as [class] / drop for one painting's label of one head; the list starts at ``suggested``
    (or at "choose a class" when that is the given label itself)."""
    options = "".join(f"<option{' selected' if n == suggested else ''}>{html.escape(n)}</option>"
                      for n in names if n != given)
    if suggested == given:  # no other label to suggest (the model agrees with the given one): make the user pick
        options = "<option value='' selected disabled>choose a class</option>" + options
    return (f"<div class='review' data-row='{row}' data-head='{html.escape(head)}' data-path='{html.escape(path)}'>"
            "<button class='keep' data-decision='keep'>keep</button>"
            "<button class='relabel' data-decision='relabel'>relabel as</button>"
            f"<select>{options}</select> <button class='drop' data-decision='drop'>drop</button></div>")
