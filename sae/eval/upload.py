"""Push a run's dictionary to the Hugging Face Hub (sae.core.hub.upload), from the command line.

    python -m sae.eval.upload runs/topk-x owner/repo [--path-in-repo topk-512] [--private]

Uploads cfg.json, sae_weights.safetensors, sparsity.safetensors (and a binding SAE's
binding_weights.safetensors) with a generated model card (README.md: what it is, the run's
end-of-run metrics, how to load it with sae.load and SAELens), in one commit. The dictionary is
loaded first, so a broken one is refused before anything is sent. Authentication is
huggingface_hub's (HF_TOKEN, or `huggingface-cli login`), or --token.
Bad input (no dictionary there, a malformed repo id or path) is one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from sae.core import hub
from sae.core.io import load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae.eval.upload", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run folder (sae/ inside) or dictionary folder (cfg.json)")
    p.add_argument("repo_id", help="Hub repo, owner/name (created if absent)")
    p.add_argument("--path-in-repo", default="", help="folder inside the repo ('' = its root)")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="", help="commit message")
    p.add_argument("--token", default=None, help="Hub token (default: huggingface_hub's login)")
    args = p.parse_args(argv)
    try:
        folder, _ = hub.locate_dictionary(args.path)
        hub.check_repo_path(args.repo_id, args.path_in_repo)
        load(folder)  # refuse a dictionary that does not load before sending anything
        commit = hub.upload(args.path, args.repo_id, args.path_in_repo, revision=args.revision, private=args.private,
                            commit_message=args.message, token=args.token)
    except (ValueError, OSError, ImportError) as e:  # HubError and LoadError are ValueErrors
        print(f"upload: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (the Hub client's own errors: one line, not a traceback)
        print(f"upload: error: {args.repo_id}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(f"uploaded {folder} to {args.repo_id}{'/' + args.path_in_repo if args.path_in_repo else ''}: "
          f"{getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
