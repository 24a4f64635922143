"""PP-SSL's text corpus: fine-grained attribute descriptions, embedded once by a CLIP text
encoder and stored as an Arrow/Parquet table.

PP-SSL (Li et al., arXiv 2412.00134) [paper] builds "a fine-grained textual description
corpus" for its Anti-Interference Strategy; the paper's corpus is not public, so everything
here is ours [ours]:

- CUB layout with `attributes/attributes.txt` (CUB's 312 attribute names, or the embedded
  synthetic set's 20, which it writes in the same layout): one sentence per attribute,
  `has_bill_shape::curved_(up_or_down)` -> "a photo of a bird with a curved (up or down) bill
  shape";
- otherwise domain templates (part x descriptor) for birds, cars, aircraft and, for the generic
  folder layout, objects. Class names are never used, so the corpus carries no label
  information beyond the domain.

The table has columns `text: string` and `embedding: fixed_size_list<float32>[D]`
(L2-normalised CLIP text embeddings) and records in its schema metadata the key it was built
for: the CLIP model, the weights' identity (resolved path, size, mtime — not a content hash,
so a multi-GB file is not re-read) and the texts. `build_corpus` returns an existing table with
the same key without loading CLIP.

CLIP comes from open_clip (`pip install 'fgray[clip]'`). `clip_model` is an open_clip model
name (e.g. "ViT-B-32"; use "ViT-B-32-quickgelu" for OpenAI's weights), an `hf-hub:` or
`local-dir:` identifier, or a path to an open_clip model-config JSON (registered under its
file stem). `clip_weights` is a local weights file or, with hub access, an open_clip
pretrained tag such as "openai" or "laion2b_s34b_b79k".
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgray.errors import UserError
from fgray.storage import atomic_path

__all__ = ["ClipBundle", "attribute_sentence", "build_corpus", "corpus_info", "corpus_texts",
           "load_clip", "load_corpus", "require_open_clip", "select_subset", "template_texts",
           "weights_identity"]

META_KEY = b"fgray.corpus.key"
META_INFO = b"fgray.corpus.info"
INSTALL_HINT = "install it with `pip install 'fgray[clip]'` (open_clip_torch)"

# Domain templates: (part, descriptors). Colours are left out for cars and aircraft, where
# they vary within a class and are exactly the interference AIS should suppress.
_TEMPLATES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "bird": ("bird", {
        "bill": ("short", "long", "hooked", "conical", "curved", "dagger-shaped", "needle-like",
                 "spatulate"),
        "wing pattern": ("plain", "single-barred", "double-barred", "spotted", "striped"),
        "eye ring": ("white", "red", "yellow", "blue", "black", "thin", "bold"),
        "tail": ("forked", "rounded", "pointed", "squared", "notched", "fan-shaped"),
        "crown": ("plain", "red", "yellow", "blue", "black", "striped", "crested"),
        "breast": ("plain", "spotted", "streaked", "barred"),
        "wings": ("rounded", "pointed", "broad", "long", "tapered"),
        "legs": ("short", "long", "black", "pink", "yellow"),
    }),
    "car": ("car", {
        "headlights": ("round", "rectangular", "slim", "swept-back", "projector", "quad"),
        "grille": ("wide", "narrow", "mesh", "horizontal-bar", "vertical-bar", "chrome",
                   "kidney-shaped", "hexagonal"),
        "wheels": ("alloy", "steel", "large", "small", "multi-spoke", "five-spoke"),
        "roofline": ("sloping", "flat", "fastback", "boxy", "convertible"),
        "taillights": ("horizontal", "vertical", "round", "wraparound", "LED strip"),
        "body": ("sedan", "coupe", "hatchback", "wagon", "SUV", "pickup", "minivan", "van",
                 "sports car"),
        "bumper": ("chrome", "body-coloured", "sculpted", "plain"),
        "side windows": ("two", "three", "frameless", "tall", "narrow"),
    }),
    "aircraft": ("aircraft", {
        "engines": ("two wing-mounted", "four wing-mounted", "three", "tail-mounted",
                    "turboprop", "jet", "propeller"),
        "wings": ("low-mounted", "high-mounted", "swept", "straight", "delta", "gull"),
        "tail": ("T-shaped", "conventional", "twin", "cruciform", "V-shaped"),
        "fuselage": ("wide-body", "narrow-body", "long", "short", "double-deck"),
        "nose": ("pointed", "rounded", "drooping", "blunt"),
        "winglets": ("blended", "raked", "split-scimitar", "wingtip fence"),
        "landing gear": ("retractable", "fixed", "tricycle", "tail-wheel"),
        "cockpit windows": ("four-pane", "six-pane", "bubble", "wrap-around"),
    }),
    "object": ("object", {
        "shape": ("round", "elongated", "angular", "curved", "symmetric", "tapered"),
        "texture": ("smooth", "rough", "striped", "spotted", "patterned", "glossy", "matte"),
        "edge": ("sharp", "soft", "serrated", "rounded"),
        "part": ("small", "large", "pointed", "flat", "protruding"),
        "pattern": ("plain", "barred", "checked", "speckled", "mottled"),
    }),
}
_DOMAIN = {"cub": "bird", "cars": "car", "aircraft": "aircraft", "folder": "object"}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def attribute_sentence(name: str, noun: str = "bird") -> str:
    """One CUB attribute name (`has_<part>::<value>`) as a sentence about a `noun`."""
    part, sep, value = name.partition("::")
    if not sep:
        raise UserError(f"attribute {name!r}: expected the CUB form has_<part>::<value>")
    part = re.sub(r"^has_", "", part).replace("_", " ").strip()
    value = re.sub(r"\s+", " ", value.replace("_", " ")).strip()
    if part in ("size", "shape"):
        return f"a photo of {_article(value)} {value} {noun}"
    if part == "bill length":
        return f"a photo of a {noun} with a bill {value}"
    return f"a photo of a {noun} with {_article(value)} {value} {part}"


def template_texts(domain: str) -> list[str]:
    """The template corpus of a domain ("bird", "car", "aircraft", "object")."""
    noun, parts = _TEMPLATES[domain]
    return [f"a photo of {_article(noun)} {noun} with {_article(d)} {d} {part}"
            for part, descs in parts.items() for d in descs]


def select_subset(n: int, size: int | None) -> np.ndarray:
    """Indices of `size` of `n` items, evenly spaced so every attribute group keeps some
    (CUB lists its attributes grouped by part); all of them for None or 0."""
    if not size or size >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))


def corpus_texts(dataset_format: str, data_root: str | Path) -> list[str]:
    """The descriptions for a dataset: its attribute names when it has them, else the
    templates of its domain."""
    from fgray.data.formats import load_dataset

    if dataset_format not in _DOMAIN:
        raise UserError(f"unknown dataset format {dataset_format!r}: expected one of"
                        f" {', '.join(_DOMAIN)}")
    ds = load_dataset(dataset_format, data_root, val_fraction=0.0)
    noun = _TEMPLATES[_DOMAIN[dataset_format]][0]
    if ds.attributes:
        texts = [attribute_sentence(a, noun) for a in ds.attributes]
    else:
        texts = template_texts(_DOMAIN[dataset_format])
    return list(dict.fromkeys(texts))  # drop duplicates, keep order


# -- CLIP ------------------------------------------------------------------------------------


def require_open_clip(what: str = "PP-SSL's AIS (kd_weight > 0)") -> None:
    if importlib.util.find_spec("open_clip") is None:
        raise UserError(f"{what} needs open_clip, which is not installed: {INSTALL_HINT},"
                        " or set kd_weight=0")


def _model_name(clip_model: str) -> str:
    """The open_clip name of `clip_model`, registering a config JSON file first."""
    import open_clip

    path = Path(clip_model).expanduser()
    if clip_model.endswith(".json"):
        if not path.is_file():
            raise UserError(f"clip_model {clip_model!r}: config file not found; expected an"
                            " open_clip model name (e.g. ViT-B-32) or a model-config JSON")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"clip_model {clip_model!r}: not a readable JSON file"
                            f" ({type(exc).__name__})") from None
        if open_clip.get_model_config(path.stem) != config:  # register once per content
            open_clip.add_model_config(path)
        if open_clip.get_model_config(path.stem) != config:
            raise UserError(f"clip_model {clip_model!r}: not an open_clip model config"
                            " (expected embed_dim, vision_cfg and text_cfg)")
        return path.stem
    return clip_model


def weights_identity(clip_model: str, clip_weights: str | None) -> dict[str, str | int]:
    """What identifies a CLIP model for caching, cheaply: the model name (plus the content hash
    of a config JSON) and the weights file's resolved path, size and mtime (or the tag)."""
    model: dict[str, str | int] = {"model": clip_model}
    cfg = Path(clip_model).expanduser()
    if clip_model.endswith(".json") and cfg.is_file():
        model["model"] = cfg.stem
        model["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    if clip_weights is None:
        model["weights"] = "none"
        return model
    path = Path(clip_weights).expanduser()
    if path.is_file():
        st = path.stat()
        model.update(weights=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    else:
        model["weights"] = clip_weights  # a pretrained tag
    return model


def _is_weights_file(clip_weights: str) -> bool:
    p = Path(clip_weights).expanduser()
    return p.is_file() or os.sep in clip_weights or p.suffix in (
        ".pt", ".pth", ".bin", ".safetensors", ".npz")


def check_clip_weights(clip_model: str, clip_weights: str | None) -> None:
    """Fail early, with the fix, when CLIP weights are missing (no model is loaded)."""
    require_open_clip()
    if clip_weights is None:
        raise UserError(f"kd_weight > 0 (AIS) needs CLIP weights for {clip_model}: set"
                        " clip_weights=PATH to a local open_clip weights file (or an open_clip"
                        " pretrained tag such as 'openai' with hub access), or kd_weight=0")
    if _is_weights_file(clip_weights) and not Path(clip_weights).expanduser().is_file():
        raise UserError(f"clip_weights {clip_weights!r}: file not found; expected a local"
                        " open_clip weights file (.pt/.bin/.safetensors) or a pretrained tag")


@dataclass
class ClipBundle:
    """A loaded CLIP model and what feeding it needs."""

    model: nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: dict[str, str | int]

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """(N, D) L2-normalised text embeddings, float32 on the CPU."""
        device = next(self.model.parameters()).device
        out = [self.model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(device))
               for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=1).cpu()


def load_clip(clip_model: str, clip_weights: str | None) -> ClipBundle:
    """An open_clip model in eval mode, frozen, with its tokenizer and image preprocessing."""
    check_clip_weights(clip_model, clip_weights)
    import open_clip

    from fgray.models.backbone import _hub_offline, _hub_offline_mode

    name = _model_name(clip_model)
    identity = weights_identity(clip_model, clip_weights)
    local = Path(clip_weights).expanduser()
    pretrained = str(local) if local.is_file() else clip_weights
    offline = False if local.is_file() else _hub_offline()
    try:
        with _hub_offline_mode(offline):
            model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        where = " (offline and not in the local cache)" if offline else ""
        raise UserError(f"cannot load CLIP {name!r} with weights {clip_weights!r}{where}:"
                        f" {type(exc).__name__}: {first}; pass clip_weights=PATH to a local"
                        " open_clip weights file matching clip_model") from exc
    model.eval().requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ClipBundle(model, tokenizer, (int(size[0]), int(size[1])),
                      tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)), identity)


# -- the table -------------------------------------------------------------------------------


def _corpus_key(identity: dict, texts: list[str]) -> str:
    blob = json.dumps({"clip": identity, "texts": texts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def corpus_info(path: str | Path) -> dict:
    """The metadata a corpus table was written with: key, clip identity, count and dim."""
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"corpus {path}: file not found; build one with `fgray corpus`")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 -- any parse failure of a user's file is theirs
        raise UserError(f"corpus {path}: not a Parquet table ({type(exc).__name__})") from None
    meta = schema.metadata or {}
    if META_KEY not in meta or "embedding" not in schema.names or "text" not in schema.names:
        raise UserError(f"corpus {path}: not an fgray corpus table (expected columns text,"
                        " embedding and fgray metadata); rebuild it with `fgray corpus`")
    info = json.loads(meta[META_INFO])
    info["key"] = meta[META_KEY].decode()
    return info


def load_corpus(path: str | Path) -> tuple[list[str], Tensor]:
    """The texts and their (N, D) float32 embeddings."""
    import pyarrow.parquet as pq

    corpus_info(path)
    table = pq.read_table(Path(path).expanduser())
    texts = table.column("text").to_pylist()
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return texts, torch.from_numpy(values.reshape(len(texts), dim).copy())


def write_corpus(path: Path, texts: list[str], embeddings: Tensor, key: str,
                 info: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = embeddings.detach().float().cpu().numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                               emb.shape[1])
    table = pa.table({"text": pa.array(texts, pa.string()), "embedding": column})
    table = table.replace_schema_metadata({META_KEY: key.encode(),
                                           META_INFO: json.dumps(info).encode()})
    with atomic_path(path) as tmp:  # a reader never sees half a table
        pq.write_table(table, tmp)


def build_corpus(dataset_format: str, data_root: str | Path, clip_model: str,
                 clip_weights: str | None, out_path: str | Path,
                 max_size: int | None = None) -> Path:
    """Write the corpus of a dataset to `out_path` (Parquet) and return the path; an existing
    table built for the same CLIP model, weights and texts is reused as is."""
    if max_size is not None and max_size < 1:
        raise UserError(f"max_size={max_size}: expected a positive number of texts or None")
    texts = corpus_texts(dataset_format, data_root)
    texts = [texts[i] for i in select_subset(len(texts), max_size)]
    check_clip_weights(clip_model, clip_weights)
    identity = weights_identity(clip_model, clip_weights)
    key = _corpus_key(identity, texts)
    out = Path(out_path).expanduser()
    if out.is_dir():
        raise UserError(f"corpus output {out} is a folder: expected a file path such as"
                        f" {out / 'corpus.parquet'}")
    if out.is_file():
        try:
            if corpus_info(out)["key"] == key:
                return out
        except UserError:
            pass  # an unreadable or foreign file is rebuilt
    clip = load_clip(clip_model, clip_weights)
    emb = clip.encode_texts(texts)
    write_corpus(out, texts, emb, key,
                 {"clip": identity, "count": len(texts), "dim": int(emb.shape[1]),
                  "dataset_format": dataset_format})
    return out
