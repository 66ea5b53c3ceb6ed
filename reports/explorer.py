"""The token explorer: one self-contained HTML page where clicking a word of a generated answer
shows that token's relevancy map over the image and its relevancy over the text before it.

Input: relevancy/ rows with ``target_kind == "answer_tokens"`` (one row per answer token and
method; ``char_start``/``char_end`` place the token in ``generations.answer``; ``text_map`` is the
relevancy over all sequence positions). For each of up to ``report.explorer_samples`` samples the
page holds:

* the base image, downscaled to ``report.explorer_image_size`` pixels (longest side), as one
  greyscale PNG, with the body contour as a polygon (only when ``report.include_images`` is true;
  otherwise the grids are drawn bare on a neutral background and no image data is embedded);
* per token and method, the image grid (grid_h x grid_w, row-major) min-max normalised for
  display and quantised to one byte per cell (base64), with its raw minimum and maximum;
* per token and method with a text map, the relevancy of every earlier displayed position
  (prompt tokens, when a tokenizer is at hand, and earlier answer tokens), scaled to the largest
  of them excluding position token_start - 1 (the read-out row's own position, whose value
  carries the identity term of R = I + ...), one byte per position.

The page draws the grid on a canvas over the image (plain JavaScript, no external resource):
the grid is stretched over the whole image, each cell covering W/gw x H/gh pixels, smoothed
bilinearly between cell centres like the report's overlays. Prompt tokens come from decoding
``generations.sequence_ids`` with the model's tokenizer (``AutoTokenizer.from_pretrained`` on the
manifest's model path, local files only); without one the prompt text is shown unshaded.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from reports.figures import method_order

if TYPE_CHECKING:
    from reports.data import RunData

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ---------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(model: dict[str, Any], config_model: dict[str, Any] | None = None) -> Any | None:
    """The run's tokenizer from local files only (the manifest's model path, then the config's);
    None when transformers or the files are not at hand. Never downloads, never raises."""
    names = [model.get("name_or_path"), (config_model or {}).get("name_or_path")]
    candidates: list[tuple[str, str | None]] = []
    for name in names:
        if not name:
            continue
        p = Path(str(name))
        if p.is_dir():
            candidates.append((str(p), None))
        elif not p.is_absolute() and (REPO / p).is_dir():
            candidates.append((str(REPO / p), None))
        elif not p.is_absolute() and not str(name).startswith((".", "/")):
            candidates.append((str(name), model.get("resolved_revision") or model.get("revision")))
    if not candidates:
        return None
    try:
        import transformers
        from transformers import AutoTokenizer
    except Exception:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for name, rev in dict.fromkeys(candidates):
            try:
                return AutoTokenizer.from_pretrained(name, revision=rev, local_files_only=True)
            except Exception as e:
                log.info("report: no tokenizer from %s (%s)", name, type(e).__name__)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return None


def tokenizer_fits(tokenizer: Any, sequence_ids: Sequence[int], image_token_id: int | None) -> bool:
    """Whether a tokenizer plausibly belongs to the model that made `sequence_ids`: every id in
    its vocabulary and, where the model's image token id is known, that id names an image token."""
    try:
        if sequence_ids is not None and len(sequence_ids) and max(int(i) for i in sequence_ids) >= len(tokenizer):
            return False
        if image_token_id is not None:
            piece = tokenizer.convert_ids_to_tokens(int(image_token_id))
            return isinstance(piece, str) and "image" in piece.lower()
    except Exception:
        return False
    return True


def token_text(tokenizer: Any, token_id: int) -> str:
    """Display text of one token: SentencePiece word marker as a space, byte tokens decoded."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return ""
    m = _BYTE_TOKEN.match(piece)
    if m:
        ch = chr(int(m.group(1), 16))
        return ch if ch.isprintable() or ch in "\n\t" else piece
    return str(piece).replace("\u2581", " ").replace("Ġ", " ").replace("Ċ", "\n")


def prompt_pieces(tokenizer: Any, sequence_ids: Sequence[int], prompt_length: int,
                  image_token_id: int | None) -> list[dict[str, Any]]:
    """Prompt positions as display pieces: {"t": text, "p": position, "k": "tok"|"special"|"image"}.

    A run of image tokens becomes one piece (``p`` its first position, ``n`` its length).
    """
    from pipeline.targets import special_token_ids

    special = special_token_ids(tokenizer)
    out: list[dict[str, Any]] = []
    ids = [int(i) for i in sequence_ids[:prompt_length]]
    i = 0
    while i < len(ids):
        tid = ids[i]
        if image_token_id is not None and tid == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            out.append({"t": f"[image: {j - i} tokens]", "p": i, "n": j - i, "k": "image"})
            i = j
            continue
        text = token_text(tokenizer, tid)
        if "\n" in text and not text.strip():  # a newline token: visible (and shadable), one line break
            text = "\u21b5" * text.count("\n") + "\n"
        out.append({"t": text, "p": i, "k": "special" if tid in special else "tok"})
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# data


def _text(x: object) -> str:
    """A string column value, '' for null / NaN."""
    return x if isinstance(x, str) else ""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, dtype=np.uint8).tobytes()).decode("ascii")


def _quantise(x: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Values -> 0..255 bytes: min-max over x (scale=None) or x / scale clipped to 0..1."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0)
    if scale is None:
        lo, hi = float(x.min()) if x.size else 0.0, float(x.max()) if x.size else 0.0
        y = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
    else:
        y = np.zeros_like(x) if scale <= 0 else np.clip(x / scale, 0.0, 1.0)
    return np.round(y * 255).astype(np.uint8)


def choose_samples(data: "RunData", n: int, seed: int) -> list[str]:
    """Up to `n` sample ids with explained answer tokens (seeded choice, returned sorted): the
    same as drawing `n` of the sorted ids without replacement, with only the chosen ids read."""
    from reports.data import answer_token_samples

    if n <= 0:
        return []
    total = answer_token_samples(data)
    if total <= n:
        return answer_token_samples(data, range(total))
    rng = np.random.default_rng(seed)
    return answer_token_samples(data, sorted(rng.choice(total, size=n, replace=False).tolist()))


def _body_polygon(mask: np.ndarray | None) -> list[list[list[int]]]:
    """The body mask's outer contours as simplified integer polygons (display pixels)."""
    if mask is None:
        return []
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        if cv2.contourArea(c) < 0.01 * mask.size:
            continue
        c = cv2.approxPolyDP(c, 1.0, True)
        out.append(c.reshape(-1, 2).astype(int).tolist())
    return out


def sample_payload(sid: str, rows: pd.DataFrame, gen: dict[str, Any] | None, sample: dict[str, Any] | None,
                   tokenizer: Any | None, image_token_id: int | None, methods: Sequence[str],
                   include_images: bool, image_size: int, max_pixels: int) -> dict[str, Any]:
    """Everything the page needs for one sample (see the module docstring)."""
    rows = rows.sort_values(["token_start", "method"])
    tokens = rows.drop_duplicates("token_start")[["token_start", "char_start", "char_end", "matched_text"]]
    answer = None if gen is None else gen.get("answer")
    if not isinstance(answer, str):  # no generation row: rebuild the text from the tokens
        answer, pos = "", []
        for t in tokens.itertuples(index=False):
            pos.append((len(answer), len(answer) + len(t.matched_text or "")))
            answer += t.matched_text or ""
        tokens = tokens.assign(char_start=[p[0] for p in pos], char_end=[p[1] for p in pos])
    # the prompt: decoded per token when possible
    pieces = None
    seq = None if gen is None else gen.get("sequence_ids")
    plen = None if gen is None else gen.get("prompt_length")
    if tokenizer is not None and seq is not None and plen is not None and tokenizer_fits(tokenizer, seq,
                                                                                        image_token_id):
        try:
            pieces = prompt_pieces(tokenizer, list(seq), int(plen), image_token_id)
        except Exception as e:
            log.info("report: prompt of %s not decoded: %s", sid, e)
            pieces = None
    text_pos = [p["p"] for p in pieces or [] if p["k"] != "image"] + [int(t) for t in tokens["token_start"]]
    text_pos_arr = np.asarray(text_pos, dtype=np.int64)
    # answer segments: [text, token index or -1]
    segments: list[list[Any]] = []
    cursor = 0
    tok_list = []
    for t in tokens.itertuples(index=False):
        cs, ce = int(t.char_start), int(t.char_end)
        if cs < cursor or ce < cs or ce > len(answer):
            continue  # overlapping or out of range: not clickable
        if cs > cursor:
            segments.append([answer[cursor:cs], -1])
        segments.append([answer[cs:ce], len(tok_list)])
        tok_list.append(int(t.token_start))
        cursor = ce
    if cursor < len(answer):
        segments.append([answer[cursor:], -1])
    by_tok = {ts: g for ts, g in rows.groupby("token_start")}
    tok_payload = []
    for ts in tok_list:
        g = by_tok[ts]
        maps: dict[str, Any] = {}
        for r in g.to_dict("records"):
            im = r.get("image_map")
            if im is None or len(im) == 0:
                continue
            grid = np.asarray(im, dtype=np.float32)
            entry: dict[str, Any] = {"g": _b64(_quantise(grid)), "lo": float(np.nanmin(grid)),
                                     "hi": float(np.nanmax(grid))}
            tm = r.get("text_map")
            if tm is not None and len(tm) > 0 and text_pos_arr.size:
                tm = np.asarray(tm, dtype=np.float64)
                valid = (text_pos_arr < ts) & (text_pos_arr < tm.size)
                vals = np.where(valid, tm[np.clip(text_pos_arr, 0, tm.size - 1)], 0.0)
                others = vals[valid & (text_pos_arr != ts - 1)]
                scale = float(others.max()) if others.size and others.max() > 0 else float(vals.max(initial=0.0))
                entry["t"] = _b64(_quantise(vals, scale))
                entry["ts"] = scale
            maps[r["method"]] = entry
        tok_payload.append({"p": ts, "m": maps})
    gh = int(rows["grid_h"].iloc[0])
    gw = int(rows["grid_w"].iloc[0])
    width = int(sample["width"]) if sample is not None and pd.notna(sample.get("width")) else gw * 16
    height = int(sample["height"]) if sample is not None and pd.notna(sample.get("height")) else gh * 16
    s = image_size / max(width, height)
    payload: dict[str, Any] = {
        "id": sid, "image_id": None if sample is None else sample.get("image_id"),
        "prompt_id": None if sample is None else sample.get("prompt_id"),
        "view": "" if sample is None else _text(sample.get("view_position")),
        "W": width, "H": height, "dw": max(1, round(width * s)), "dh": max(1, round(height * s)),
        "gh": gh, "gw": gw, "image": None, "body": [],
        "boxes": [], "prompt": pieces,
        "prompt_text": None if sample is None else _text(sample.get("prompt_text")),
        "answer": segments, "tpos": text_pos, "tokens": tok_payload,
    }
    if sample is not None and sample.get("boxes") is not None:
        payload["boxes"] = [[float(b["x"]), float(b["y"]), float(b["w"]), float(b["h"]), str(b["finding"])]
                            for b in sample["boxes"] if b]
    if include_images and sample is not None:
        payload.update(_image_payload(sample["image_path"], image_size, max_pixels))
    return payload


def _image_payload(path: str, image_size: int, max_pixels: int) -> dict[str, Any]:
    import io

    from PIL import Image

    from reports.gallery import display_image

    try:
        pixels, _, mask = display_image(path, max_side=image_size, max_pixels=max_pixels)
    except Exception as e:  # unreadable now: the grid is shown bare
        log.warning("report: explorer image %s not readable: %s", path, e)
        return {}
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG",
                                                                                            optimize=True)
    h, w = pixels.shape[:2]
    return {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "dw": int(w), "dh": int(h), "body": _body_polygon(mask)}


def build_payload(relevancy_maps: pd.DataFrame, generations: pd.DataFrame, samples: pd.DataFrame,
                  sample_ids: Sequence[str], tokenizer: Any | None, image_token_id: int | None,
                  include_images: bool, image_size: int, max_pixels: int = 60_000_000) -> dict[str, Any]:
    """The explorer's JSON payload for the chosen samples."""
    rel = relevancy_maps[(relevancy_maps["target_kind"] == "answer_tokens") & (relevancy_maps["status"] == "ok")]
    rel = rel[rel["sample_id"].isin(set(sample_ids))]
    methods = method_order(sorted(rel["method"].unique()))
    gens = {} if generations.empty else {r["sample_id"]: r for r in
                                         generations[generations["sample_id"].isin(set(sample_ids))].to_dict("records")}
    smp = {} if samples.empty else {r["sample_id"]: r for r in
                                    samples[samples["sample_id"].isin(set(sample_ids))].to_dict("records")}
    out = []
    for sid, rows in rel.groupby("sample_id", sort=True):
        out.append(sample_payload(sid, rows, gens.get(sid), smp.get(sid), tokenizer, image_token_id, methods,
                                  include_images, image_size, max_pixels))
    return {"methods": methods, "include_images": bool(include_images), "tokenizer": tokenizer is not None,
            "samples": out}


# ---------------------------------------------------------------------------------------------
# page

PAGE_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#eef0f3;color:#1d2330}
header{background:#1f2b3d;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:1.35em}header p{margin:4px 0 0;font-size:.9em;color:#c9d3e0}
header a{color:#9fc5ff}
.bar{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid #d5dae1;padding:8px 28px;
display:flex;gap:18px;align-items:center;flex-wrap:wrap;font-size:.9em}
.bar button{border:1px solid #9aa6b5;background:#f6f8fa;border-radius:4px;padding:3px 10px;cursor:pointer;margin-right:4px;
font-size:.95em}
.bar button.on{background:#1f5fae;color:#fff;border-color:#1f5fae}
.legend{display:flex;align-items:center;gap:6px;color:#4a5360}
.legend canvas{border:1px solid #ccc}
main{padding:16px 28px 60px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 4px rgba(0,0,0,.08);margin:0 0 18px;padding:14px 16px;
display:flex;gap:20px;align-items:flex-start}
.card .left{flex:0 0 auto;text-align:center}
.card .left canvas{border:1px solid #ccd2da;background:#2a2d33;max-width:100%}
.card .right{flex:1 1 auto;min-width:0}
.meta{font-size:.82em;color:#5b6572;margin-bottom:6px}
.lbl{font-size:.75em;text-transform:uppercase;letter-spacing:.04em;color:#7a838f;margin:10px 0 3px}
.prompt,.answer{white-space:pre-wrap;word-break:break-word;line-height:1.75;font-size:.95em}
.prompt{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.82em;
background:#fafbfc;border:1px solid #e6e9ee;border-radius:4px;padding:6px 8px;max-height:180px;overflow:auto}
.prompt span.special{color:#8a94a3}
.prompt span.image{background:#e4e8ef;color:#556;border-radius:3px;padding:0 4px}
.answer span.w{cursor:pointer;border-radius:3px;border-bottom:1px dotted #9aa6b5}
.answer span.w:hover{outline:1px solid #1f5fae}
.answer span.w.sel{outline:2px solid #1f5fae;background:#d7e6fb !important}
.info{font-size:.85em;color:#37404c;margin-top:6px;min-height:1.3em}
.sub{font-size:.78em;color:#6b7480;margin-top:4px}
.note{background:#fff6dd;border-left:4px solid #e0b000;padding:6px 10px;font-size:.88em;margin:0 0 14px}
"""

PAGE_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('explorer-data').textContent);
let method = D.methods.includes('chefer') ? 'chefer' : D.methods[0];
const cards = [];
let lastCard = null;
function bytes(s){const b=atob(s);const a=new Uint8Array(b.length);for(let i=0;i<b.length;i++)a[i]=b.charCodeAt(i);return a;}
function jet(v){const c=x=>Math.max(0,Math.min(1,x));return [c(1.5-Math.abs(4*v-3)),c(1.5-Math.abs(4*v-2)),c(1.5-Math.abs(4*v-1))];}
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
function fmt(x){return (Math.abs(x)>=1e3||(Math.abs(x)<1e-3&&x!==0))?x.toExponential(2):x.toPrecision(3);}
function drawLegend(){const c=document.getElementById('legend');const g=c.getContext('2d');
 for(let i=0;i<c.width;i++){const [r,gg,b]=jet(i/(c.width-1));g.fillStyle=`rgb(${r*255|0},${gg*255|0},${b*255|0})`;g.fillRect(i,0,1,c.height);}}
function draw(card){
 const s=card.s, cv=card.canvas, g=cv.getContext('2d');
 const W=cv.width, H=cv.height, sx=W/s.W, sy=H/s.H;
 g.globalAlpha=1; g.fillStyle='#2a2d33'; g.fillRect(0,0,W,H);
 if(card.img && card.img.complete) g.drawImage(card.img,0,0,W,H);
 const tok=s.tokens[card.sel], m=tok?tok.m[method]:null;
 if(m){
  const v=bytes(m.g), off=document.createElement('canvas'); off.width=s.gw; off.height=s.gh;
  const oc=off.getContext('2d'), id=oc.createImageData(s.gw,s.gh);
  for(let i=0;i<v.length;i++){const [r,gg,b]=jet(v[i]/255);id.data[4*i]=r*255;id.data[4*i+1]=gg*255;id.data[4*i+2]=b*255;id.data[4*i+3]=255;}
  oc.putImageData(id,0,0);
  // the grid covers the whole image: cell (i,j) spans W/gw x H/gh pixels (non-uniform scaling)
  g.imageSmoothingEnabled = !!s.image; g.globalAlpha = s.image ? 0.45 : 1.0;
  g.drawImage(off,0,0,W,H); g.globalAlpha=1; g.imageSmoothingEnabled=true;
 }
 g.lineWidth=1.5; g.strokeStyle='#00ffff';
 for(const poly of s.body){g.beginPath();poly.forEach((p,i)=>{const x=p[0]*W/s.dw,y=p[1]*H/s.dh;i?g.lineTo(x,y):g.moveTo(x,y);});g.closePath();g.stroke();}
 g.strokeStyle='#ffffff'; g.lineWidth=1.5; g.font='10px sans-serif'; g.fillStyle='#ffffff';
 for(const b of s.boxes){g.strokeRect(b[0]*sx,b[1]*sy,b[2]*sx,b[3]*sy); g.fillText(b[4],b[0]*sx+2,b[1]*sy+11);}
 const v0=(s.view||'').toUpperCase().split(' ')[0];
 if(v0==='PA'||v0==='AP'||v0===''){const fs=Math.max(12,Math.round(Math.min(W,H)/12));g.font=`bold ${fs}px sans-serif`;g.fillStyle='#ffff00';
  g.textBaseline='top';g.fillText('R',fs/3,fs/3);g.fillText('L',W-fs/3-g.measureText('L').width,fs/3);g.textBaseline='alphabetic';}
 // text shading
 const tv = (m && m.t) ? bytes(m.t) : null;
 card.textSpans.forEach((sp,k)=>{const a=tv?tv[k]/255:0; sp.style.background = a>0 ? `rgba(255,140,0,${(0.85*a).toFixed(3)})` : '';
   sp.title = tv ? `relevancy ${fmt(a*m.ts)} (${(100*a).toFixed(0)}% of scale)` : '';});
 card.wordSpans.forEach((sp,k)=>sp.classList.toggle('sel',k===card.sel));
 card.info.textContent = tok ? (m ? `token "${card.tokText[card.sel]}" (position ${tok.p}) · ${method} · raw map range ${fmt(m.lo)} … ${fmt(m.hi)}` + (m.t? '' : ' · no text relevancy for this method')
                                  : `token "${card.tokText[card.sel]}": no ${method} map`) : 'no token selected';
}
function build(s){
 const card={s:s, sel:0, textSpans:[], wordSpans:[], tokText:[]};
 const box=el('div','card'), left=el('div','left'), right=el('div','right');
 const cv=el('canvas'); cv.width=s.dw; cv.height=s.dh; card.canvas=cv; left.appendChild(cv);
 left.appendChild(el('div','sub', s.image ? 'image + map (45% opacity), min-max per map' : 'map grid only (no patient image)'));
 if(s.image){const im=new Image(); im.onload=()=>draw(card); im.src=s.image; card.img=im;}
 right.appendChild(el('div','meta',`${s.id} · view ${s.view||'?'} · grid ${s.gh}×${s.gw} · ${s.tokens.length} answer tokens`));
 right.appendChild(el('div','lbl','prompt'+(s.prompt?' (shaded by relevancy to the selected token)':' (no tokenizer: not shaded)')));
 const pr=el('div','prompt'); const posIndex={}; s.tpos.forEach((p,k)=>posIndex[p]=k);
 if(s.prompt){ s.prompt.forEach(pc=>{const sp=el('span',pc.k,pc.t); if(pc.k!=='image'){card.textSpans[posIndex[pc.p]]=sp;} pr.appendChild(sp);}); }
 else pr.textContent = s.prompt_text||'';
 right.appendChild(pr);
 right.appendChild(el('div','lbl','answer: click a word'));
 const an=el('div','answer');
 s.answer.forEach(seg=>{ if(seg[1]<0){an.appendChild(document.createTextNode(seg[0]));return;}
   const k=seg[1], sp=el('span','w',seg[0]); sp.dataset.k=k; card.wordSpans[k]=sp; card.tokText[k]=seg[0].trim()||seg[0];
   const tp=posIndex[s.tokens[k].p]; if(tp!==undefined) card.textSpans[tp]=sp;
   sp.addEventListener('click',()=>{card.sel=k; lastCard=card; draw(card);}); an.appendChild(sp);});
 right.appendChild(an);
 card.info=el('div','info'); right.appendChild(card.info);
 for(let k=0;k<s.tpos.length;k++) if(!card.textSpans[k]) card.textSpans[k]=el('span');
 box.appendChild(left); box.appendChild(right);
 document.getElementById('cards').appendChild(box); cards.push(card); draw(card);
}
function setMethod(m){method=m; document.querySelectorAll('#methods button').forEach(b=>b.classList.toggle('on',b.dataset.m===m)); cards.forEach(draw);}
const mb=document.getElementById('methods');
D.methods.forEach(m=>{const b=el('button','',m); b.dataset.m=m; b.addEventListener('click',()=>setMethod(m)); mb.appendChild(b);});
drawLegend(); D.samples.forEach(build); setMethod(method);
document.addEventListener('keydown',e=>{ if(!lastCard) return; const n=lastCard.s.tokens.length;
 if(e.key==='ArrowRight'){lastCard.sel=Math.min(n-1,lastCard.sel+1);draw(lastCard);} if(e.key==='ArrowLeft'){lastCard.sel=Math.max(0,lastCard.sel-1);draw(lastCard);} });
window.explorer={cards:cards,setMethod:setMethod,get method(){return method;}};
})();
"""


_HTML_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def html_safe_json(text: str) -> str:
    """JSON text safe inside an HTML <script> element: <, >, & and the JavaScript line
    terminators U+2028 / U+2029 written as \\u escapes (JSON has them only inside strings, where
    the escape means the same character), so no id, prompt or answer can end the element, open a
    comment or break the script."""
    return "".join(_HTML_UNSAFE.get(c, c) for c in text)


def render_page(payload: dict[str, Any], title: str, subtitle: str = "") -> str:
    """The self-contained explorer page (data inline as JSON, plain JavaScript, no external resource)."""
    data = html_safe_json(json.dumps(_clean(payload), separators=(",", ":"), allow_nan=False, default=_json_default))
    note = "" if payload.get("include_images") else (
        '<div class="note">Patient images are left out of this report (<code>report.include_images=false</code>): '
        "the maps are drawn on a neutral background.</div>")
    if not payload.get("samples"):
        note += '<div class="note">No sample of this run was explained with target kind <code>answer_tokens</code>.</div>'
    text_note = ("Text shading: relevancy of each earlier position (prompt and answer tokens) for the selected token, "
                 "scaled to the largest of them (the position just before the token, whose value holds the "
                 "identity term, is left out of the scale and may saturate).")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)} · <a href="report.html">back to the report</a></p></header>
<div class="bar"><span>Method:</span><span id="methods"></span>
<span class="legend">low <canvas id="legend" width="120" height="10"></canvas> high</span>
<span style="color:#5b6572">Click any word of an answer; ← → step through the tokens.</span></div>
<main>{note}<p class="sub">{html.escape(text_note)} Image maps are min-max normalised per token for display; the
patient's right is on the image's left (R / L marked on frontal views). Boxes: ground truth of the sample.</p>
<div id="cards"></div></main>
<script type="application/json" id="explorer-data">{data}</script>
<script>{PAGE_JS}</script>
</body></html>
"""


def _clean(o: Any) -> Any:
    """A JSON-safe copy: NaN / infinite floats become null, numpy scalars plain numbers."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
