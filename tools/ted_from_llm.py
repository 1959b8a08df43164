"""Statements for your own captions, written by a local instruct model (the paper's TED-6K recipe, Sec. 3).

    python tools/ted_from_llm.py --captions captions.jsonl --generator Qwen/Qwen3-8B --out runs/ted6k_mine

captions.jsonl holds {"caption": str, "caption_type": "image"|"video", "key"?: str} per line. For each
caption and statement type the model writes one true statement (or null), then three minimal edits that
contradict the caption. The output is a TED-6k.json-format benchmark that 02 scores with --benchmark; an
option the model did not deliver stays in the file, marked `failed: ...`, and is not scored.
"""
import importlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plumbing  # noqa: E402
from common import check_caption  # noqa: E402
from plumbing import DataError, log  # noqa: E402
from world import claims  # noqa: E402

build = importlib.import_module("01_build_ted6k")  # the benchmark's counts and its folder, as 01 writes them

TYPE_HINTS = {
    "Action Recognition": "the actions the subjects perform",
    "Adjective": "attributes such as colour, size, material or appearance",
    "Adverb": "how something is done or placed (manner, speed, degree)",
    "Basic Event": "what is present or what happens",
    "Coreference": "an object introduced and then referred back to (the former / the latter / it)",
    "OCR": "text visible in the image or video",
    "Quantity": "how many things there are",
    "Spatial Relationship": "where things are relative to each other",
    "Temporal": "the order in which things happen",
}


def positive_prompt(caption, kind, stype):
    """The prompt asking for one true statement of type `stype` (or null)."""
    return (f"Here is a detailed caption of a{'n image' if kind == 'image' else ' video'}.\n\nCaption: {caption}\n\n"
            f"Write ONE short statement (about 15 words) that is true according to the caption and is "
            f"about {TYPE_HINTS[stype]} ({stype}). If the caption says nothing of this kind, answer null.\n"
            'Reply with JSON only: {"statement": "..."} or {"statement": null}')


def negative_prompt(caption, kind, stype, positive):
    """The prompt asking for three minimal edits of `positive` that contradict the caption."""
    return (f"Here is a detailed caption of a{'n image' if kind == 'image' else ' video'}.\n\nCaption: {caption}\n\n"
            f"True statement ({stype}): {positive}\n\n"
            "Write exactly THREE statements that each contradict the caption and differ from the true "
            "statement as little as possible (change one detail of the kind above, keep the rest).\n"
            'Reply with JSON only: {"statements": ["...", "...", "..."]}')


def parse_json_object(text):
    """The first JSON object in a model's reply, or None."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = dec.raw_decode(text[i:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


class HFGenerator:
    """A local causal LM through transformers: chat template, greedy decoding."""

    def __init__(self, name_or_path, max_new_tokens=256, device=None, dtype="auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.device = plumbing.pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=plumbing.pick_dtype(self.device, dtype)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def generate(self, prompt):
        """The model's reply to one user turn."""
        msgs = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n"
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _failed(reason):
    """An option the model did not deliver, kept in the file with the reason as its status."""
    return {"statement": None, "status": f"failed: {reason}"}


def llm_statements(caption, kind, stype, generator):
    """One statement-type entry in TED-6k format, written by `generator`; failures are marked, never raised."""
    try:
        reply = generator.generate(positive_prompt(caption, kind, stype))
    except Exception as e:  # a generator that crashes on one prompt must not stop the run
        return {"question": claims.QUESTIONS[stype], "correct_statement": _failed(f"generation error {e!r}"),
                "incorrect_statements": []}
    obj = parse_json_object(reply)
    entry = {"question": claims.QUESTIONS[stype], "incorrect_statements": []}
    if obj is None or "statement" not in obj:
        entry["correct_statement"] = _failed("no JSON object with a 'statement' key")
        return entry
    pos = obj["statement"]
    if pos is None:
        entry["correct_statement"] = {"statement": None, "status": "null"}
        return entry
    if not isinstance(pos, str) or not pos.strip():
        entry["correct_statement"] = _failed("statement is not a non-empty string")
        return entry
    pos = pos.strip()
    try:
        obj = parse_json_object(generator.generate(negative_prompt(caption, kind, stype, pos)))
    except Exception:  # as above: marked below as a failed negative
        obj = None
    negs = obj.get("statements") if obj else None
    if not isinstance(negs, list) or len(negs) != 3:
        entry["incorrect_statements"] = [_failed("expected a JSON list of exactly three statements")] * 3
    else:
        seen = {pos}
        for s in negs:
            if not isinstance(s, str) or not s.strip():
                entry["incorrect_statements"].append(_failed("not a non-empty string"))
            elif s.strip() in seen:
                entry["incorrect_statements"].append(_failed("duplicate of another option"))
            else:
                seen.add(s.strip())
                entry["incorrect_statements"].append({"statement": s.strip(), "status": "success"})
    ok = any(o["status"] == "success" for o in entry["incorrect_statements"])
    # Without a valid negative the instance cannot be scored: mark the positive too, so the file stays valid.
    entry["correct_statement"] = {"statement": pos, "status": "success"} if ok else \
        {"statement": pos, "status": "failed: no valid negative"}
    return entry


def read_captions(path):
    """[(key, caption, kind)] from a captions jsonl; errors name the file and record."""
    out, n = [], {"image": 0, "video": 0}
    for i, r in enumerate(plumbing.read_jsonl(path, required=("caption",)), 1):
        where = f"{path}: record {i}"
        kind = r.get("caption_type", r.get("kind"))
        check_caption(r["caption"], kind, where)
        key = r.get("key", f"{kind}_{n[kind]}")
        if not isinstance(key, str) or not key:
            raise DataError(f"{where}: key must be a non-empty string, got {key!r}")
        n[kind] += 1
        out.append((key, r["caption"], kind))
    dup = sorted(k for k, c in Counter(k for k, _, _ in out).items() if c > 1)
    if dup:
        raise DataError(f"{path}: duplicate key(s) {dup[:5]}")
    return out


def build_from_llm(captions, generator):
    """TED-6k-format dict for [(key, caption, kind)] with statements from `generator`."""
    bench = {}
    for key, caption, kind in plumbing.progress(captions, desc="statements"):
        types = [t for t in claims.STATEMENT_TYPES if kind == "video" or t not in claims.VIDEO_ONLY_TYPES]
        bench[key] = {"caption": caption, "caption_type": kind,
                      "statements": {t: llm_statements(caption, kind, t, generator) for t in types}}
    return bench


def most_common_failure(bench):
    """The most frequent `failed: ...` status in a generated benchmark (why nothing could be scored)."""
    statuses = Counter(o.get("status") for rec in bench.values() for info in rec["statements"].values()
                       for o in [info["correct_statement"]] + info["incorrect_statements"])
    failed = [(n, s) for s, n in statuses.items() if str(s).startswith("failed")]
    return max(failed)[1] if failed else "every positive was null"


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--captions", required=True, help="captions jsonl")
    p.add_argument("--generator", required=True, help="hub id or local folder of an instruct model")
    p.add_argument("--out", default="runs/ted6k", help="folder for ted6k.json")
    p.add_argument("--overwrite", action="store_true", help="replace the benchmark there (once the new one is built)")
    p.add_argument("--max-new-tokens", type=plumbing.positive_int, default=256, help="reply length limit")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--generator-dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on a GPU that has it, else fp32")
    p.add_argument("--threads", type=plumbing.nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    t0, out = time.time(), Path(args.out)
    build.check_replaceable(out, "--out", build.BENCH_FILES, "a benchmark", args.overwrite)
    captions = read_captions(args.captions)
    plumbing.set_threads(args.threads)
    bench = build_from_llm(captions, HFGenerator(args.generator, args.max_new_tokens, args.device, args.generator_dtype))
    counts = build.count_cells(bench)
    build.require_instances(counts, f"--generator {args.generator}: no scorable statement for the {len(captions)} "
                                    f"caption(s) of {args.captions} (most common: {most_common_failure(bench)})")
    build.write_benchmark(out, bench)
    log(build.format_table(counts, paper=False))
    log(f"wrote {out / 'ted6k.json'} ({sum(counts.values())} instances) in {time.time() - t0:.1f}s")
    return bench


if __name__ == "__main__":
    plumbing.run_cli(main)
