#!/usr/bin/python3
"""A Python client of shardserve's public API (proto/shardserve/v1/generation.proto).

Needs Debian's python3-grpcio and python3-grpc-tools (scripts/setup.sh installs them); the stubs
are generated from the .proto file at start.

    /usr/bin/python3 scripts/client_example.py --prompt "The capital of France is"
    /usr/bin/python3 scripts/client_example.py --prompt-ids 1,2,3 --stream
"""
import argparse
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")


def stubs():
    out = tempfile.mkdtemp(prefix="shardserve-stubs-")
    if protoc.main(["protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}",
                    os.path.join(PROTO, "shardserve/v1/generation.proto")]) != 0:
        sys.exit("grpc_tools.protoc failed")
    sys.path.insert(0, out)
    from shardserve.v1 import generation_pb2, generation_pb2_grpc
    return generation_pb2, generation_pb2_grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--model", default="", help="default: the server's only model")
    ap.add_argument("--prompt")
    ap.add_argument("--prompt-ids", help="comma-separated token ids, used verbatim")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args()
    pb, pb_grpc = stubs()
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(args.address))
    req = pb.GenerateRequest(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature)
    if args.prompt_ids:
        req.prompt_token_ids.ids.extend(int(x) for x in args.prompt_ids.split(","))
    else:
        req.text = args.prompt or "Hello"
    try:
        if args.stream:
            for delta in stub.GenerateStream(req, timeout=120):
                print(delta.text or " ".join(map(str, delta.token_ids)), end="", flush=True)
            print()
        else:
            r = stub.Generate(req, timeout=120)
            print(r.text if r.text else ",".join(map(str, r.token_ids)))
            print(f"[{pb.FinishReason.Name(r.finish_reason)}, {r.usage.prompt_tokens} prompt + "
                  f"{r.usage.completion_tokens} generated tokens]", file=sys.stderr)
    except grpc.RpcError as e:
        sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
