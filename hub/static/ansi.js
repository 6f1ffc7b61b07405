// ANSI escape sequences → styled segments. SGR (colours 16/256/truecolour,
// bold, dim, italic, underline, inverse, strike) becomes style; every other
// escape (cursor movement, erase, OSC titles and links) is dropped, never shown.
// A carriage return starts the line over, as a terminal overwrites it.
"use strict";

(function (global) {
  const ESC = "\x1b";

  function initialStyle() {
    return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false, strike: false };
  }

  // The 256-colour cube and grey ramp (codes 16-255) as CSS rgb().
  function color256(n) {
    if (n < 16) return { index: n };
    if (n < 232) {
      const v = n - 16;
      const level = (x) => (x === 0 ? 0 : 55 + x * 40);
      return { rgb: [level(Math.floor(v / 36)), level(Math.floor(v / 6) % 6), level(v % 6)] };
    }
    const g = 8 + (n - 232) * 10;
    return { rgb: [g, g, g] };
  }

  // Extended colour after 38/48: returns [colour or null, parameters consumed].
  function extended(params, i) {
    const mode = params[i + 1];
    if (mode === 5 && params.length > i + 2) {
      const n = params[i + 2];
      return [n >= 0 && n <= 255 ? color256(n) : null, 3];
    }
    if (mode === 2 && params.length > i + 4) {
      const rgb = [params[i + 2], params[i + 3], params[i + 4]];
      return [rgb.every((c) => c >= 0 && c <= 255) ? { rgb } : null, 5];
    }
    return [null, params.length - i];
  }

  function applySgr(style, params) {
    if (params.length === 0) params = [0];
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      if (p === 0 || Number.isNaN(p)) Object.assign(style, initialStyle());
      else if (p === 1) style.bold = true;
      else if (p === 2) style.dim = true;
      else if (p === 3) style.italic = true;
      else if (p === 4) style.underline = true;
      else if (p === 7) style.inverse = true;
      else if (p === 9) style.strike = true;
      else if (p === 21) style.underline = true;
      else if (p === 22) { style.bold = false; style.dim = false; }
      else if (p === 23) style.italic = false;
      else if (p === 24) style.underline = false;
      else if (p === 27) style.inverse = false;
      else if (p === 29) style.strike = false;
      else if (p >= 30 && p <= 37) style.fg = { index: p - 30 };
      else if (p === 38) { const [c, n] = extended(params, i); if (c) style.fg = c; i += n - 1; }
      else if (p === 39) style.fg = null;
      else if (p >= 40 && p <= 47) style.bg = { index: p - 40 };
      else if (p === 48) { const [c, n] = extended(params, i); if (c) style.bg = c; i += n - 1; }
      else if (p === 49) style.bg = null;
      else if (p >= 90 && p <= 97) style.fg = { index: p - 90 + 8 };
      else if (p >= 100 && p <= 107) style.bg = { index: p - 100 + 8 };
    }
  }

  // Parse one line: a list of {text, style} segments (style null when plain).
  function parse(input) {
    let segments = [];
    let style = initialStyle();
    let styled = false;
    let text = "";
    const flush = () => {
      if (text) segments.push({ text, style: styled ? Object.assign({}, style) : null });
      text = "";
    };
    let i = 0;
    const n = input.length;
    while (i < n) {
      const ch = input[i];
      if (ch === ESC) {
        const next = input[i + 1];
        if (next === "[") {
          // CSI: parameters 0x30-0x3F, intermediates 0x20-0x2F, a final 0x40-0x7E.
          let j = i + 2;
          while (j < n && input.charCodeAt(j) >= 0x30 && input.charCodeAt(j) <= 0x3f) j++;
          const paramText = input.slice(i + 2, j);
          while (j < n && input.charCodeAt(j) >= 0x20 && input.charCodeAt(j) <= 0x2f) j++;
          if (j >= n) { i = n; break; }
          const final = input[j];
          if (final === "m" && /^[0-9;:]*$/.test(paramText)) {
            flush();
            const params = paramText === "" ? [] : paramText.split(/[;:]/).map((s) => (s === "" ? 0 : parseInt(s, 10)));
            applySgr(style, params);
            styled = JSON.stringify(style) !== JSON.stringify(initialStyle());
          }
          i = j + 1;
          continue;
        }
        if (next === "]" || next === "P" || next === "_" || next === "^" || next === "X") {
          // OSC/DCS/APC/PM/SOS: up to BEL or ST (ESC \).
          let j = i + 2;
          while (j < n && input[j] !== "\x07" && !(input[j] === ESC && input[j + 1] === "\\")) j++;
          i = j >= n ? n : input[j] === "\x07" ? j + 1 : j + 2;
          continue;
        }
        // Two- or three-character escapes (charset selection, keypad modes...).
        i += next === "(" || next === ")" || next === "#" ? 3 : 2;
        continue;
      }
      if (ch === "\r") {
        // A lone CR at the very end (CRLF output) changes nothing.
        if (i + 1 < n) { flush(); segments = []; }
        i++;
        continue;
      }
      const code = input.charCodeAt(i);
      if (code === 0x9b) { i++; continue; } // 8-bit CSI introducer: drop
      if (code < 0x20 && ch !== "\t") {
        if (ch === "\b") text = text.slice(0, -1);
        i++;
        continue;
      }
      text += ch;
      i++;
    }
    flush();
    return segments;
  }

  function plainText(input) {
    return parse(input).map((s) => s.text).join("");
  }

  // CSS for one segment's style: classes for the 16 palette colours (so the
  // theme picks readable shades), inline colours for 256/truecolour.
  function styleClasses(style) {
    const classes = [];
    const css = {};
    let fg = style.fg, bg = style.bg;
    if (style.inverse) { [fg, bg] = [bg || { inverse: "fg" }, fg || { inverse: "bg" }]; }
    const put = (c, kind) => {
      if (!c) return;
      if (c.inverse) classes.push("ansi-inv-" + kind);
      else if (c.index !== undefined) classes.push("ansi-" + kind + c.index);
      else css[kind === "fg" ? "color" : "backgroundColor"] = "rgb(" + c.rgb.join(",") + ")";
    };
    put(fg, "fg");
    put(bg, "bg");
    if (style.bold) classes.push("ansi-bold");
    if (style.dim) classes.push("ansi-dim");
    if (style.italic) classes.push("ansi-italic");
    if (style.underline) classes.push("ansi-underline");
    if (style.strike) classes.push("ansi-strike");
    return { classes, css };
  }

  global.KerutaAnsi = { parse, plainText, styleClasses, color256 };
})(typeof window !== "undefined" ? window : globalThis);
