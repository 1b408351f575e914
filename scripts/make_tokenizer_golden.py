#!/usr/bin/env python3
"""Makes the Hugging Face goldens for the tokenizer tests (run once, offline, where transformers is).

    python3 scripts/make_tokenizer_golden.py --tokenizer tests/data/llama-3.1-tokenizer \
        --cases tests/data/tokenizer/cases.jsonl --decode-cases tests/data/tokenizer/decode_cases.jsonl \
        --chat-cases tests/data/tokenizer/chat_cases.jsonl --out OUTDIR

Writes into OUTDIR (copy them to tests/data/tokenizer/):
  golden.jsonl         per case: text, ids (add_special_tokens=False), ids_bos (True),
                       decoded / decoded_skip: decode(ids_bos) with skip_special_tokens False / True
  decode_golden.jsonl  per id sequence: ids, decoded, decoded_skip
  chat_golden.jsonl    per conversation: messages, add_generation_prompt, text (apply_chat_template
                       with tokenize=False), ids (that text encoded as apply_chat_template does)
  golden_meta.json     library versions and the cross-check counts

Encodings come from transformers' AutoTokenizer on the shipped files and are cross-checked against
the `tokenizers` library directly; decodes use clean_up_tokenization_spaces=False (the raw decode,
which is what streaming must produce). Any disagreement is counted in golden_meta.json and printed.
"""
import argparse
import json
import os
import platform
import sys
import traceback


def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            try:
                line = json.dumps(r, ensure_ascii=False)
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: keep the record, escaped
                line = json.dumps(r, ensure_ascii=True)
            f.write(line + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json and tokenizer_config.json")
    parser.add_argument("--cases", required=True)
    parser.add_argument("--decode-cases", default=None, help="default: decode_cases.jsonl beside --cases")
    parser.add_argument("--chat-cases", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.decode_cases is None:
        args.decode_cases = os.path.join(os.path.dirname(args.cases), "decode_cases.jsonl")
    os.makedirs(args.out, exist_ok=True)

    meta = {"python": sys.version, "platform": platform.platform(), "problems": []}
    problems = meta["problems"]

    raw = None
    try:
        import tokenizers
        meta["tokenizers"] = tokenizers.__version__
        raw = tokenizers.Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    except Exception:
        problems.append("tokenizers: " + traceback.format_exc())

    hf = None
    try:
        import transformers
        meta["transformers"] = transformers.__version__
        hf = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
        meta["transformers_class"] = type(hf).__name__
    except Exception:
        problems.append("AutoTokenizer: " + traceback.format_exc())
        try:
            from transformers import PreTrainedTokenizerFast
            hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.tokenizer, "tokenizer.json"))
            meta["transformers_class"] = "PreTrainedTokenizerFast(tokenizer_file=...)"
        except Exception:
            problems.append("PreTrainedTokenizerFast: " + traceback.format_exc())
    if hf is None and raw is None:
        print("FATAL: neither transformers nor tokenizers could load the tokenizer", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        sys.exit(1)

    counts = {"encode_mismatch_tokenizers_vs_transformers": 0, "decode_mismatch_tokenizers_vs_transformers": 0,
              "chat_ids_mismatch_apply_chat_template": 0, "encode_errors": 0, "chat_errors": 0}

    def encode(text, add_special_tokens):
        hf_ids = hf.encode(text, add_special_tokens=add_special_tokens) if hf is not None else None
        raw_ids = raw.encode(text, add_special_tokens=add_special_tokens).ids if raw is not None else None
        if hf_ids is not None and raw_ids is not None and list(hf_ids) != list(raw_ids):
            counts["encode_mismatch_tokenizers_vs_transformers"] += 1
            problems.append(f"encode differs, transformers vs tokenizers: {text[:80]!r} {list(hf_ids)[:20]} "
                            f"vs {list(raw_ids)[:20]}")
        return list(hf_ids if hf_ids is not None else raw_ids)

    def decode(ids, skip):
        hf_text = None
        if hf is not None:
            try:
                hf_text = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            except TypeError:
                hf_text = hf.decode(ids, skip_special_tokens=skip)
        raw_text = raw.decode(ids, skip_special_tokens=skip) if raw is not None else None
        if hf_text is not None and raw_text is not None and hf_text != raw_text:
            counts["decode_mismatch_tokenizers_vs_transformers"] += 1
            problems.append(f"decode differs, transformers vs tokenizers: {hf_text[:80]!r} vs {raw_text[:80]!r}")
        # The tokenizers library's decode never cleans up spaces: prefer it as the reference.
        return raw_text if raw_text is not None else hf_text

    golden = []
    for i, case in enumerate(read_jsonl(args.cases)):
        text = case["text"]
        try:
            ids = encode(text, False)
            ids_bos = encode(text, True)
            golden.append({"text": text, "ids": ids, "ids_bos": ids_bos, "decoded": decode(ids_bos, False),
                           "decoded_skip": decode(ids_bos, True)})
        except Exception:
            counts["encode_errors"] += 1
            problems.append(f"case {i}: " + traceback.format_exc())
    write_jsonl(os.path.join(args.out, "golden.jsonl"), golden)

    decode_golden = []
    if os.path.exists(args.decode_cases):
        for i, case in enumerate(read_jsonl(args.decode_cases)):
            try:
                decode_golden.append({"ids": case["ids"], "decoded": decode(case["ids"], False),
                                      "decoded_skip": decode(case["ids"], True)})
            except Exception:
                counts["encode_errors"] += 1
                problems.append(f"decode case {i}: " + traceback.format_exc())
        write_jsonl(os.path.join(args.out, "decode_golden.jsonl"), decode_golden)
    else:
        problems.append(f"no decode cases at {args.decode_cases}")

    chat_golden = []
    if hf is None:
        problems.append("chat goldens need transformers; none written")
    else:
        for i, case in enumerate(read_jsonl(args.chat_cases)):
            try:
                text = hf.apply_chat_template(case["messages"], tokenize=False,
                                              add_generation_prompt=case["add_generation_prompt"])
                # What apply_chat_template(tokenize=True) does: the rendered text, no extra specials.
                ids = list(hf.encode(text, add_special_tokens=False))
                try:
                    tokenized = hf.apply_chat_template(case["messages"], tokenize=True,
                                                       add_generation_prompt=case["add_generation_prompt"])
                    if hasattr(tokenized, "keys") and "input_ids" in tokenized:
                        tokenized = tokenized["input_ids"]
                    if list(tokenized) != ids:
                        counts["chat_ids_mismatch_apply_chat_template"] += 1
                except Exception:
                    problems.append(f"chat case {i} apply_chat_template(tokenize=True): " + traceback.format_exc())
                chat_golden.append({"messages": case["messages"],
                                    "add_generation_prompt": case["add_generation_prompt"],
                                    "text": text, "ids": ids})
            except Exception:
                counts["chat_errors"] += 1
                problems.append(f"chat case {i}: " + traceback.format_exc())
        write_jsonl(os.path.join(args.out, "chat_golden.jsonl"), chat_golden)

    meta["counts"] = counts
    meta["written"] = {"golden.jsonl": len(golden), "decode_golden.jsonl": len(decode_golden),
                       "chat_golden.jsonl": len(chat_golden)}
    with open(os.path.join(args.out, "golden_meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    for p in problems[:50]:
        print("problem:", p[:2000], file=sys.stderr)
    print(f"summary: {len(golden)} encode cases, {len(decode_golden)} decode cases, {len(chat_golden)} chat cases; "
          f"transformers {meta.get('transformers')}, tokenizers {meta.get('tokenizers')}; counts {counts}; "
          f"{len(problems)} problems; written to {args.out}")


if __name__ == "__main__":
    main()
