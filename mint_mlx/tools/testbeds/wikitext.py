"""Plain text from Wikipedia markup: the ``wiki-text`` testbed (``tune.txt``, ``heldout.txt``)
out of the ``gensim`` wheel's test dump."""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mint_mlx.paths import cache_root
from mint_mlx.tools.testbeds.wheels import WIKI_BZ2, extract_file

_DROP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
}


_NS_LINK = re.compile(
    r"^\s*:?\s*(file|image|category|media|wikipedia|wp|template|help|portal|special|wikt|"
    r"[a-z]{2,3}(-[a-z]+)?)\s*:",
    re.IGNORECASE,
)


def _remove_nested(text: str, pattern: re.Pattern[str]) -> str:
    """Apply an innermost-match removal until nothing changes (templates and tables nest)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return new
        text = new


def _link_text(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _NS_LINK.match(inner):
        return ""
    return inner.split("|")[-1] if "|" in inner else inner


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


_UNBALANCED_OPEN = re.compile(r"\{\{.*")  # to the end of the line


_UNBALANCED_CLOSE = re.compile(r"^.*?\}\}", re.MULTILINE)  # from the start of the line


_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)


_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


_EXT_LINK_TEXT = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")


_EXT_LINK_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\]")


_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)


_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|code|pre|imagemap|hiero|chem)\b[^>]*>"
    r".*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)


_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")


_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


_QUOTES = re.compile(r"'{2,}")


_MAGIC = re.compile(r"__[A-Z]+__")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs separated by blank lines.

    Drops comments, references, templates ``{{...}}`` (nested), tables ``{| ... |}``, file, image,
    category and interwiki links, ``<math>``-like blocks and reference-list sections; keeps the
    visible text of ``[[target|text]]`` and ``[url text]`` links, heading titles (as their own
    line), list items (without their markers) and the content of other HTML tags. Deterministic and
    dependency-free; not a full MediaWiki parser, but clean enough for perplexity text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_nested(text, _TEMPLATE)
    # Literal braces inside a template's text leave it unbalanced: cut what is left of it.
    text = _UNBALANCED_CLOSE.sub("", _UNBALANCED_OPEN.sub("", text))
    text = _remove_nested(text, _TABLE)
    while True:  # innermost links first, so a caption's links resolve before its File: dies
        new = _INNER_LINK.sub(_link_text, text)
        if new == text:
            break
        text = new
    text = _EXT_LINK_TEXT.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs: list[str] = []
    current: list[str] = []
    dropping = False

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            title = heading.group(2).strip()
            dropping = title.lower() in _DROP_SECTIONS
            if title and not dropping:
                paragraphs.append(title)
            continue
        if dropping:
            continue
        if not line or line.startswith(("|", "!", "{|", "|}", "{{", "}}")):
            flush()
            continue
        if line[0] in "*#:;":
            flush()
            line = line.lstrip("*#:; ").strip()
            if line:
                paragraphs.append(re.sub(r"\s+", " ", line))
            continue
        current.append(re.sub(r"\s+", " ", line))
    flush()
    paragraphs = [p for p in (re.sub(r"\s+([,.;:])", r"\1", p).strip() for p in paragraphs) if p]
    return "\n\n".join(paragraphs)


def iter_wiki_articles(bz2_path: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace, non-redirect page, in file order."""
    with bz2.open(bz2_path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.findtext("{*}ns")
            title = el.findtext("{*}title") or ""
            redirect = el.find("{*}redirect") is not None
            body = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not redirect and body:
                yield title, body


def build_wiki_text(out: Path) -> dict[str, Any]:
    """Write ``tune.txt``, ``heldout.txt`` and ``manifest.json`` into ``out``; return the manifest.

    Split: articles alternate, even positions (0, 2, ...) to tune, odd ones to held-out, so both
    parts cover the whole file and neither depends on any randomness.
    """
    src = extract_file(WIKI_BZ2, cache_root() / "sources" / Path(WIKI_BZ2.member).name)
    parts: dict[str, list[str]] = {"tune": [], "heldout": []}
    titles: dict[str, list[str]] = {"tune": [], "heldout": []}
    index = 0
    for title, body in iter_wiki_articles(src):
        plain = strip_wiki_markup(body)
        if len(plain) < 200:  # stubs and disambiguation lists
            continue
        part = "tune" if index % 2 == 0 else "heldout"
        parts[part].append(f"{title}\n\n{plain}")
        titles[part].append(title)
        index += 1
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "name": "wiki-text",
        "source": {
            "package": f"{WIKI_BZ2.package}=={WIKI_BZ2.version}",
            "file": WIKI_BZ2.member,
            "sha256": WIKI_BZ2.sha256,
        },
        "split": "articles alternate: even positions -> tune.txt, odd -> heldout.txt",
        "files": {},
    }
    for part, docs in parts.items():
        text = "\n\n\n".join(docs) + "\n"
        (out / f"{part}.txt").write_text(text, encoding="utf-8")
        manifest["files"][f"{part}.txt"] = {
            "articles": len(docs),
            "chars": len(text),
            "words": len(text.split()),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "first_titles": titles[part][:10],
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
