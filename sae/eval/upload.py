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

import sys
from dataclasses import dataclass

from sae.core import hub
from sae.core.files import first_line
from sae.core.config import argument, option, parse_config
from sae.core.io import load


@dataclass
class UploadConfig:
    path: str = argument("run folder (sae/ inside) or dictionary folder (cfg.json)")
    repo_id: str = argument("Hub repo, owner/name (created if absent)")
    path_in_repo: str = option("", "folder inside the repo ('' = its root)")
    revision: str = option("", "branch to commit to ('' = main)")
    private: bool = option(False, "create the repo private")
    message: str = option("", "commit message")
    token: str = option("", "Hub token ('' = huggingface_hub's login)")


def main(argv=None) -> int:
    args = parse_config(UploadConfig, argv, "python -m sae.eval.upload", __doc__.split("\n\n")[0],
                        positional=("path", "repo_id"))
    try:
        folder, _ = hub.locate_dictionary(args.path)
        hub.check_repo_path(args.repo_id, args.path_in_repo)
        load(folder)  # refuse a dictionary that does not load before sending anything
        commit = hub.upload(args.path, args.repo_id, args.path_in_repo, revision=args.revision or None, private=args.private,
                            commit_message=args.message, token=args.token or None)
    except (ValueError, OSError, ImportError) as e:  # HubError and LoadError are ValueErrors
        print(f"upload: error: {first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (the Hub client's own errors: one line, not a traceback)
        print(f"upload: error: {args.repo_id}: {first_line(e)}",
              file=sys.stderr)
        return 2
    print(f"uploaded {folder} to {args.repo_id}{'/' + args.path_in_repo if args.path_in_repo else ''}: "
          f"{getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
