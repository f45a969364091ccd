"""The `fastencoder` command: `demo` and `report` (the static kernel report)."""
import argparse
import sys


def demo(args):
    import torch

    import fastencoder
    from fastencoder.kernels import layer_norm, linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    hidden, intermediate, batch, seqlen = 768, 3072, args.batch, args.seqlen
    make = lambda *shape: (0.02 * torch.randn(*shape, device=device)).to(dtype)
    x = torch.randn(batch, seqlen, hidden, device=device).to(dtype)
    # the feed-forward half of a BERT-base layer: GEMM + bias + GELU, GEMM + bias, add & norm
    with torch.no_grad():
        h = linear(x, make(intermediate, hidden), make(intermediate), activation="gelu")
        h = linear(h, make(hidden, intermediate), make(hidden))
        y = layer_norm(h, torch.ones(hidden, device=device, dtype=dtype), make(hidden), 1e-12, residual=x)
    from fastencoder.kernels.backend import use_triton

    ran = "Triton kernels" if use_triton(x.device) else "PyTorch reference"
    print(f"backend={fastencoder.get_backend()} ({ran}) device={device} dtype={dtype}")
    print(f"BERT-base feed-forward block on [{batch}, {seqlen}, {hidden}] -> {tuple(y.shape)}, "
          f"finite={bool(torch.isfinite(y).all())}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastencoder", description="Fused Triton kernels for BERT and ALBERT")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run a BERT-base-shaped block and print the backend used")
    demo_parser.add_argument("--batch", type=int, default=8)
    demo_parser.add_argument("--seqlen", type=int, default=128)
    commands.add_parser("report", help="static kernel report: compile every kernel for sm_80 and sm_90a",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "report":
        from fastencoder.kernels import report

        return report.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
