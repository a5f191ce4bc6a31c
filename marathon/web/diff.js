// A unified diff, parsed and shown per file with line numbers and syntax highlighting.

import { h } from "./dom.js";

/** Parse ``git diff`` output into files of hunks of lines. */
export function parseDiff(text) {
  const files = [];
  let file = null;
  let oldNo = 0;
  let newNo = 0;
  const start = (header) => {
    file = { header, oldPath: null, newPath: null, lines: [], adds: 0, dels: 0, binary: false };
    files.push(file);
  };
  for (const line of text.replace(/\n$/, "").split("\n")) {
    if (line.startsWith("diff --git ")) {
      start(line);
      const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
      if (m) [file.oldPath, file.newPath] = [m[1], m[2]];
      continue;
    }
    if (!file) {
      if (!line) continue;
      start("");
    }
    if (line.startsWith("--- ") && !file.lines.length) {
      const p = line.slice(4);
      file.oldPath = p === "/dev/null" ? null : p.replace(/^a\//, "");
    } else if (line.startsWith("+++ ") && !file.lines.length) {
      const p = line.slice(4);
      file.newPath = p === "/dev/null" ? null : p.replace(/^b\//, "");
    } else if (line.startsWith("@@")) {
      const m = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@(.*)$/.exec(line);
      if (m) {
        oldNo = Number(m[1]);
        newNo = Number(m[2]);
      }
      file.lines.push({ kind: "hunk", text: line });
    } else if (line.startsWith("Binary files ")) {
      file.binary = true;
      file.lines.push({ kind: "meta", text: line });
    } else if (!file.lines.length || line.startsWith("\\")) {
      if (line.startsWith("\\")) file.lines.push({ kind: "meta", text: line });
      // index, mode and rename lines before the first hunk are the header's
      else if (/^(new|deleted) file mode/.test(line)) file.mode = line;
    } else if (line.startsWith("+")) {
      file.adds += 1;
      file.lines.push({ kind: "add", text: line.slice(1), newNo: newNo++ });
    } else if (line.startsWith("-")) {
      file.dels += 1;
      file.lines.push({ kind: "del", text: line.slice(1), oldNo: oldNo++ });
    } else if (line.startsWith(" ") || line === "") {
      file.lines.push({ kind: "ctx", text: line.slice(1), oldNo: oldNo++, newNo: newNo++ });
    }
  }
  return files;
}

// ------------------------------------------------------------------ highlighting

const KW = {
  py: "and as assert async await break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return True try while with yield match case self",
  js: "async await break case catch class const continue debugger default delete do else export extends false finally for from function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while with yield interface type enum implements private public protected readonly",
  go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
  rs: "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while None Some Ok Err",
  c: "auto break case char const continue default do double else enum extern float for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void volatile while class namespace public private protected template typename virtual new delete true false nullptr this bool import package extends implements final throws",
  sh: "if then else elif fi for while until do done case esac in function return local export set unset echo exit cd",
  css: "",
};
const LANG = {
  py: "py", pyi: "py", js: "js", mjs: "js", cjs: "js", ts: "js", tsx: "js", jsx: "js", json: "json",
  go: "go", rs: "rs", c: "c", h: "c", cc: "c", cpp: "c", hpp: "c", java: "c", kt: "c", cs: "c", swift: "c",
  sh: "sh", bash: "sh", zsh: "sh", toml: "conf", yaml: "conf", yml: "conf", ini: "conf", cfg: "conf",
  css: "css", scss: "css", html: "html", xml: "html", svg: "html", md: "md", markdown: "md",
};

function language(path) {
  if (!path) return null;
  const base = path.split("/").pop();
  if (base === "Makefile" || base === "Dockerfile") return "sh";
  const ext = base.includes(".") ? base.split(".").pop().toLowerCase() : "";
  return LANG[ext] || null;
}

const COMMENT = { py: "#.*", sh: "#.*", conf: "[#;].*", js: "//.*|/\\*.*?(?:\\*/|$)", go: "//.*|/\\*.*?(?:\\*/|$)", rs: "//.*|/\\*.*?(?:\\*/|$)", c: "//.*|/\\*.*?(?:\\*/|$)", css: "/\\*.*?(?:\\*/|$)" };
const STRING = `"(?:[^"\\\\]|\\\\.)*"?|'(?:[^'\\\\]|\\\\.)*'?|\`(?:[^\`\\\\]|\\\\.)*\`?`;
const NUMBER = "\\b(?:0x[0-9a-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b";
const cache = new Map();

function tokenizer(lang) {
  if (cache.has(lang)) return cache.get(lang);
  let re = null;
  if (lang === "html") {
    re = /(<!--.*?(?:-->|$))|("[^"]*"?|'[^']*'?)|(<\/?[\w:-]+|\/?>)/g;
  } else if (lang === "md") {
    re = /(^#{1,6} .*)|(`[^`]*`?)|(^\s*(?:[-*+]|\d+\.) )/g;
  } else if (lang === "json") {
    re = /("(?:[^"\\]|\\.)*"?)|(\btrue\b|\bfalse\b|\bnull\b)|(-?\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b)/g;
  } else {
    const kws = (KW[lang] || "").split(" ").filter(Boolean);
    const kw = kws.length ? `\\b(?:${kws.join("|")})\\b` : "(?!)";
    const com = COMMENT[lang] || "(?!)";
    re = new RegExp(`(${com})|(${STRING})|(${kw})|(${NUMBER})|(\\b[A-Za-z_]\\w*(?=\\())`, "g");
  }
  cache.set(lang, re);
  return re;
}

const CLASSES = {
  html: ["tok-com", "tok-str", "tok-tag"],
  md: ["tok-kw", "tok-str", "tok-num"],
  json: ["tok-str", "tok-kw", "tok-num"],
};

/** The line as text nodes and spans (tok-kw, tok-str, tok-com, tok-num, tok-fn, tok-tag). */
export function highlight(text, lang) {
  if (!lang || !text) return [text];
  const re = tokenizer(lang);
  const classes = CLASSES[lang] || ["tok-com", "tok-str", "tok-kw", "tok-num", "tok-fn"];
  const out = [];
  let last = 0;
  re.lastIndex = 0;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    if (m[0] === "") {
      re.lastIndex += 1;
      continue;
    }
    const group = m.slice(1).findIndex((g) => g !== undefined && g !== "");
    if (group < 0 || !classes[group]) continue;
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(h("span", { class: classes[group] }, m[0]));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

const MAX_LINES = 4000;

/** The whole diff as DOM: one section per file. */
export function renderDiff(text) {
  const files = parseDiff(text);
  if (!files.length) return h("p", { class: "muted" }, "No changes.");
  let budget = MAX_LINES;
  return h(
    "div",
    { class: "diff-view" },
    files.map((f) => {
      const path = f.newPath || f.oldPath || "(unknown)";
      const lang = language(path);
      const rows = [];
      for (const l of f.lines) {
        if (budget-- <= 0) {
          rows.push(h("tr", { class: "hunk" }, h("td", { colspan: 3 }, "… (the rest of the diff is not shown; marathon diff has it all)")));
          break;
        }
        if (l.kind === "hunk" || l.kind === "meta") {
          rows.push(h("tr", { class: "hunk" }, h("td", { colspan: 3 }, l.text)));
          continue;
        }
        const sign = l.kind === "add" ? "+" : l.kind === "del" ? "-" : " ";
        rows.push(
          h(
            "tr",
            { class: l.kind },
            h("td", { class: "ln" }, l.oldNo ?? ""),
            h("td", { class: "ln" }, l.newNo ?? ""),
            h("td", { class: "code" }, sign, highlight(l.text, lang)),
          ),
        );
      }
      const label = !f.oldPath ? "new file" : !f.newPath ? "deleted" : f.oldPath !== f.newPath ? `renamed from ${f.oldPath}` : "";
      return h(
        "section",
        { class: "diff-file", "aria-label": `changes to ${path}` },
        h(
          "header",
          {},
          h("strong", {}, path),
          label ? h("span", { class: "muted" }, label) : null,
          h("span", { class: "adds" }, `+${f.adds}`),
          h("span", { class: "dels" }, `−${f.dels}`),
        ),
        h("div", { class: "diff-scroll" }, h("table", { class: "diff" }, h("tbody", {}, rows))),
      );
    }),
  );
}
