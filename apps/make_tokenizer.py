"""Derive a truncated CLIP BPE tokenizer (``vocab.json`` / ``merges.txt``) from open-clip's BPE file.

CLIP (Radford et al., 2021) uses byte-level BPE with 49,152 merges. The embedded model keeps only the
first ``--num-merges`` of them: the vocabulary is then the 256 byte symbols, their 256 ``</w>``
variants, one token per kept merge and the two special tokens, in CLIP's own order. Any prefix of the
merge list is still a valid BPE, and it keeps the text encoder's embedding table small.

    pip download --no-deps open-clip-torch -d /tmp/oc
    python -m apps.make_tokenizer --wheel /tmp/oc/open_clip_torch-*.whl --out accel/models/mini-sd-cifar10/tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's merge list: line 0 is a header; 49152 - 256 - 2 merges follow.
CLIP_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_merges(bpe_gz: bytes, num_merges: int) -> list[tuple[str, str]]:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    return merges[:num_merges]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    return {s: i for i, s in enumerate(symbols)}


def write_tokenizer(bpe_gz: bytes, out_dir: Path, num_merges: int, model_max_length: int = 77) -> int:
    """Write a CLIPTokenizer folder; returns the vocabulary size."""
    merges = read_merges(bpe_gz, num_merges)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # Same special-token layout as Stable Diffusion v1's tokenizer (pad with the end token).
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return len(vocab)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="open-clip-torch wheel holding the BPE file")
    parser.add_argument("--bpe", type=Path, help="the BPE file itself (bpe_simple_vocab_16e6.txt.gz)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-merges", type=int, default=4096)
    args = parser.parse_args(argv)
    if (args.wheel is None) == (args.bpe is None):
        parser.error("give exactly one of --wheel or --bpe")
    if args.wheel is not None:
        with zipfile.ZipFile(args.wheel) as wheel:
            bpe_gz = wheel.read(BPE_MEMBER)
    else:
        bpe_gz = args.bpe.read_bytes()
    vocab_size = write_tokenizer(bpe_gz, args.out, args.num_merges)
    print(f"wrote {args.out} (vocab_size={vocab_size})")


if __name__ == "__main__":
    main()
