"""The `fastencoder` command: `bench`, `demo`, `report` (the static kernel report) and `compare`."""
import argparse
import os
import sys
from pathlib import Path

# keep Triton 3.9's fused multiply-add default, and silence its warning about the coming change
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def demo(args):
    import torch
    import transformers

    import fastencoder
    from fastencoder.kernels.backend import use_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = fastencoder.BertModel(transformers.BertConfig()).to(device=device, dtype=dtype).eval()  # BERT-base
    lengths = torch.randint(args.seqlen // 4, args.seqlen + 1, (args.batch,))
    attention_mask = (torch.arange(args.seqlen)[None, :] < lengths[:, None]).to(device)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), device=device)
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    ran = "Triton kernels" if use_triton(device, dtype) else "the PyTorch path"
    print(f"backend={fastencoder.get_backend()} ({ran}), device={device}, dtype={dtype}")
    print(f"BERT-base encoded a ragged batch of {args.batch} x {args.seqlen} tokens: "
          f"last_hidden_state {tuple(output.last_hidden_state.shape)}, pooler_output {tuple(output.pooler_output.shape)}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastencoder", description="Fused Triton kernels for BERT and ALBERT")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="encode a batch with a BERT-base model and print the backend used")
    demo_parser.add_argument("--batch", type=int, default=8)
    demo_parser.add_argument("--seqlen", type=int, default=128)
    bench_parser = commands.add_parser(
        "bench", help="benchmark kernels and models against PyTorch and Hugging Face (without a GPU: the models "
                      "on the CPU)")
    bench_parser.add_argument("--quick", action="store_true",
                              help="a short subset: one model, one dtype (without a GPU: one batch size)")
    bench_parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the code runs (CI)")
    bench_parser.add_argument("--out", type=Path, default=Path("results"),
                              help="results go to a folder inside this one named by GPU, versions and date")
    commands.add_parser("report", help="static kernel report: compile every kernel for sm_80 and sm_90a",
                        add_help=False)
    compare_parser = commands.add_parser(
        "compare", help="pretrain BERT (MLM+NSP) and ALBERT (MLM+SOP), fine-tune both, compare them")
    compare_parser.add_argument("--preset", choices=("tiny", "cpu", "small", "base"), default="tiny",
                                help="model and run size: tiny (a quick look), cpu (every task learned on a "
                                     "CPU), small, base (BERT-base; a GPU)")
    compare_parser.add_argument("--corpus", type=Path, nargs="+", default=(),
                                help="text files, documents separated by blank lines (default: Python's "
                                     "standard library docstrings)")
    compare_parser.add_argument("--tokenizer", type=Path, help="a folder with tokenizer.json or vocab.txt "
                                                               "(default: WordPiece trained on the corpus)")
    compare_parser.add_argument("--classification", type=Path, help="CSV or JSON lines with text and label")
    compare_parser.add_argument("--qa", type=Path, help="SQuAD-format JSON")
    compare_parser.add_argument("--steps", type=int, help="pretraining steps (fine-tuning scales with them)")
    compare_parser.add_argument("--seed", type=int, default=0)
    compare_parser.add_argument("--seeds", type=int, default=1,
                                help="runs of each model (seeds --seed, --seed + 1, ...): mean and spread")
    compare_parser.add_argument("--out", type=Path, default=Path("compare"))
    args, rest = parser.parse_known_args(argv)
    if args.command == "report":
        from fastencoder.kernels import report

        return report.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench":
        from fastencoder.benchmarks import sweep

        out_dir = sweep.run(quick=args.quick, smoke=args.smoke, out_root=args.out)
        return 1 if sweep.failed_rows(out_dir) else 0
    elif args.command == "compare":
        from fastencoder import compare

        compare.run(preset=args.preset, corpus_paths=args.corpus, classification_file=args.classification,
                    qa_file=args.qa, tokenizer_dir=args.tokenizer, steps=args.steps, seed=args.seed,
                    seeds=args.seeds, out=args.out)
    else:
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
