"""Push a compressed checkpoint to the Hub as one commit, then (optionally) check that what landed works.

The folder is only read: a failed push leaves it whole and the same call can simply be repeated. The token is
passed to `huggingface_hub` and never put into a message, a log line or a file.

A failed push or a failed verification leaves the remote as it was before the call: a repo that this call created
is deleted; in a repo that existed, a verified push commits to a temporary branch, verifies that commit and only
then commits the same files to `main` (whose head it checks has not moved), so `main` never holds an unverified
commit. The error says in one line which of these happened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload compressed model (hf_compress)"
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


class HubPushError(RuntimeError):
    """A push or its verification failed; the message says why and that the local folder is untouched."""


@dataclasses.dataclass
class PushResult:
    """What `push_to_hub` did: the repo, the commit and the files in it, and the verification, if asked."""

    repo_id: str
    endpoint: str
    commit_oid: str
    commit_url: str
    files: list[str]
    verified: dict | None = None


def _resolve_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    # `constants.ENDPOINT` is read from HF_ENDPOINT when huggingface_hub is imported; reading the variable again
    # here lets a caller set it after that import.
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _local_files(folder: str) -> list[str]:
    from ..atomic import is_temporary_name

    files = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not is_temporary_name(d))
        for name in sorted(names):
            if is_temporary_name(name):  # temporary files and the local ownership marker stay local
                continue
            files.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return files


def _describe_failure(err: BaseException, endpoint: str, token: str | None) -> str:
    """One line: what failed and what to do; never the token."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401 or status == 403:
        reason = (f"HTTP {status}: the Hub refused the token; log in with `hf auth login`, set `HF_TOKEN`, "
                  "or pass `token=` with write access")
    elif status is not None and status >= 500:
        reason = f"HTTP {status}: the Hub failed while uploading; nothing was committed, retry the same call"
    elif status is not None:
        server_msg = getattr(err, "server_message", None) or str(err).splitlines()[0]
        reason = f"HTTP {status}: {server_msg}"
    else:
        reason = f"cannot reach {endpoint} ({type(err).__name__}); check the server is up and `HF_ENDPOINT` is right, then retry"
    message = f"Push to {endpoint} failed: {reason}."
    if token:
        message = message.replace(token, "***")
    return message


def _transport_errors() -> tuple[type, ...]:
    errors: list[type] = [OSError]
    for mod in ("httpx2", "httpx"):
        try:
            errors.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(
    folder: str,
    repo_id: str,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    verify: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    verify_atol: float = 1e-4,
) -> PushResult:
    """
    Upload a checkpoint folder (weights, config, tokenizer, `compression_report.json`, `README.md`, plot) to a
    Hub model repo in a single commit.

    Args:
        folder (`str`): the checkpoint folder written by `save_pretrained` / `save_compressed`, with its report
            and card.
        repo_id (`str`): `namespace/name`; the repo is created if it does not exist.
        endpoint (`str`, *optional*): the Hub URL; defaults to `HF_ENDPOINT`, then `https://huggingface.co`.
        token (`str`, *optional*): defaults to the usual places (`HF_TOKEN`, the token saved by `hf auth login`).
        private (`bool`, defaults to `False`): create the repo private.
        verify (`bool`, defaults to `False`): after pushing, download the commit into a temporary folder, check
            every file's SHA-256 against the local one, reload the model with `from_pretrained` (or
            `load_compressed`) and recompute the examples recorded in the report's `verification`: the same
            predictions, the same metric, logits within `verify_atol`.
        commit_message (`str`): the commit's title.
        verify_atol (`float`, defaults to `1e-4`): tolerance on the recorded logits.

    Returns:
        [`PushResult`]: the commit id and URL, the files, and the verification figures.

    Raises:
        `HubPushError`: the server is down, refused the token (401), failed (500), or the verification failed: one
            line, which ends by saying where the remote stands. The remote is as it was before the call (a repo this
            call created is deleted; an existing repo's `main` is not moved) and the local folder is unchanged, so
            the same call can be retried.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} does not exist; save the compressed checkpoint there first.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"folder {folder!r} has no config.json; it is not a saved checkpoint (use `save_pretrained`).")
    try:
        validate_repo_id(repo_id)
    except Exception as err:
        raise ValueError(f"repo_id must look like `namespace/name`, got {repo_id!r}.") from err
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like `namespace/name`, got {repo_id!r}.")
    if verify and not os.path.isfile(os.path.join(folder, "compression_report.json")):
        raise ValueError(f"verify=True needs {folder}/compression_report.json with recorded examples; build it with `build_report`.")
    endpoint = _resolve_endpoint(endpoint)
    files = _local_files(folder)

    api = HfApi(endpoint=endpoint, token=token)
    state = {"created": False, "branch": None}
    try:
        result = _push(api, folder, repo_id, files, private, verify, commit_message, endpoint, token, verify_atol, state)
    except HubPushError as err:
        raise HubPushError(f"{err} {_rollback(api, repo_id, state)}") from None
    except (HfHubHTTPError, *_transport_errors()) as err:
        raise HubPushError(f"{_describe_failure(err, endpoint, token)} {_rollback(api, repo_id, state)}") from None
    except ValueError as err:  # e.g. the client's own README metadata check, before any upload
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise ValueError(f"{reason} {_rollback(api, repo_id, state)}") from None
    except BaseException:  # interrupted (Ctrl-C) or a bug: still undo what this call did
        _rollback(api, repo_id, state)
        raise
    logger.info("Pushed %d files of %s to %s/%s at %s", len(files), folder, endpoint, repo_id, result.commit_oid)
    return result


def _push(api, folder, repo_id, files, private, verify, commit_message, endpoint, token, verify_atol, state) -> PushResult:
    """The push itself; `state` records what to undo on failure (`created`: the repo; `branch`: the upload branch)."""
    import uuid

    from huggingface_hub import CommitOperationAdd

    def operations():  # fresh objects for each commit (the client records upload state on them)
        return [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]

    if not api.repo_exists(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=False)
        state["created"] = True  # from here on, a failure deletes the repo again
    if verify and not state["created"]:
        # An existing repo: stage the commit on a branch, verify it there, and only then move `main`.
        head = next(b.target_commit for b in api.list_repo_refs(repo_id).branches if b.name == "main")
        branch = f"hf-compress-upload-{uuid.uuid4().hex[:12]}"
        api.create_branch(repo_id, branch=branch, revision=head)
        state["branch"] = branch
        staged = api.create_commit(repo_id, operations(), commit_message=commit_message, revision=branch,
                                   parent_commit=head)
        verified = verify_pushed(folder, repo_id, revision=staged.oid, endpoint=endpoint, token=token, atol=verify_atol)
        # One commit on `main` with the same files; `parent_commit` makes it fail if `main` moved meanwhile.
        info = api.create_commit(repo_id, operations(), commit_message=commit_message, parent_commit=head)
        state["branch"] = None
        try:
            api.delete_branch(repo_id, branch=branch)
        except Exception as err:  # main holds the verified files already: a leftover branch is only untidy
            logger.warning("Pushed and verified, but the upload branch %s of %s was not deleted (%s).", branch, repo_id,
                           type(err).__name__)
    else:
        # One `create_commit` with every file: the Hub gets a single commit, or none if anything fails before it.
        info = api.create_commit(repo_id, operations(), commit_message=commit_message)
        verified = None
        if verify:  # a repo this call created: a failure deletes it whole
            verified = verify_pushed(folder, repo_id, revision=info.oid, endpoint=endpoint, token=token, atol=verify_atol)
    return PushResult(repo_id=repo_id, endpoint=endpoint, commit_oid=info.oid, commit_url=info.commit_url, files=files,
                      verified=verified)


def _rollback(api, repo_id: str, state: dict) -> str:
    """Undo what a failed push did (see the module docstring); returns the sentence that says what the remote is now."""
    try:
        if state.get("created"):
            api.delete_repo(repo_id)
            return f"The repo {repo_id} that this push created was deleted again."
        if state.get("branch"):
            api.delete_branch(repo_id, branch=state["branch"])
            return f"`main` of {repo_id} was not moved (the upload branch was deleted)."
    except Exception as err:  # the message must still say where the remote stands
        what = f"delete the repo {repo_id}" if state.get("created") else f"delete the branch {state['branch']} of {repo_id}"
        return f"Undoing it failed too ({type(err).__name__}): {what} by hand."
    return f"{repo_id} is as it was (nothing was committed to `main`)."


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(folder: str):
    """Load a checkpoint in any format (any task: the class comes from `config.architectures`) as hf_compress loads
    it: the format's own loader ([`hf_compress.formats.detect_format`]), e.g. `load_compressed` for bitmask and
    `load_quantized` for bitsandbytes (low-bit embeddings, and the float32 path the report was measured on)."""
    from hf_compress.formats import detect_format

    return detect_format(folder).load(folder)


def verify_pushed(folder: str, repo_id: str, revision: str, endpoint: str | None = None, token: str | None = None,
                  atol: float = 1e-4) -> dict:
    """
    Download `revision` of `repo_id` into a temporary folder and check it against the local `folder`: same files
    with the same SHA-256, the model reloads, and the examples recorded in `compression_report.json` give the
    same predictions, the same metric and logits within `atol` (for a task recorded by `output_sample`, its outputs
    within `atol` and the same argmax).

    Returns:
        `dict`: `files_checked`, `examples`, `metrics` (recomputed), `recorded_metrics`, `max_abs_logit_diff`.

    Raises:
        `HubPushError`: naming the first mismatch.
    """
    import torch
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from hf_compress.metrics import load_metric

    endpoint = _resolve_endpoint(endpoint)
    with open(os.path.join(folder, "compression_report.json")) as f:
        report = json.load(f)
    sample = report.get("verification")
    if not sample:
        raise HubPushError("compression_report.json records no examples to verify; build the report with `eval_dataset=`.")
    with tempfile.TemporaryDirectory(prefix="hf-compress-verify-") as tmp:
        try:
            local = snapshot_download(repo_id, revision=revision, endpoint=endpoint, token=token, local_dir=tmp)
        except (HfHubHTTPError, *_transport_errors()) as err:
            raise HubPushError(_describe_failure(err, endpoint, token).replace("Push to", "Verification download from")) from None
        local_files = _local_files(folder)
        for f in local_files:
            remote = os.path.join(local, f)
            if not os.path.isfile(remote):
                raise HubPushError(f"Verification failed: {f} was pushed but is missing from {repo_id}@{revision[:8]}.")
            if _sha256(remote) != _sha256(os.path.join(folder, f)):
                raise HubPushError(f"Verification failed: {f} in {repo_id}@{revision[:8]} differs from the local file.")
        model = load_checkpoint(local)
        if "outputs" in sample:  # any task: the recorded outputs (`model_cards.output_sample`)
            from hf_compress.tasks.evaluation import compare_outputs

            diff = compare_outputs(model, sample)
            examples = len(next(iter(sample["inputs"].values())))
            if diff > atol:
                what = "a different argmax" if diff == float("inf") else f"outputs off by up to {diff:.2e}"
                raise HubPushError(f"Verification failed: the downloaded model gives {what} on the {examples} recorded "
                                   f"examples ({', '.join(sample['outputs'])}).")
            return {"files_checked": len(local_files), "examples": examples, "metrics": {}, "recorded_metrics": {},
                    "max_abs_logit_diff": diff}
        inputs = {k: torch.tensor(v) for k, v in sample["inputs"].items()}
        with torch.no_grad():
            logits = model(**inputs).logits.float()
    preds = logits.argmax(-1).tolist()
    diff = float((logits - torch.tensor(sample["logits"])).abs().max())
    metrics = {}
    for name in sample["metrics"]:
        metrics.update(load_metric(name).compute(predictions=preds, references=sample["labels"]))
    if preds != sample["predictions"] or diff > atol or any(abs(metrics[k] - v) > 1e-9 for k, v in sample["metrics"].items()):
        changed = sum(p != q for p, q in zip(preds, sample["predictions"]))
        raise HubPushError(
            f"Verification failed: the downloaded model gives {metrics} (max logit diff {diff:.2e}, {changed} of "
            f"{len(preds)} predictions differ from the recorded ones) on the {len(preds)} recorded examples, the "
            f"report says {sample['metrics']}."
        )
    return {"files_checked": len(local_files), "examples": len(preds), "metrics": metrics,
            "recorded_metrics": sample["metrics"], "max_abs_logit_diff": diff}


# Public for the other writers to the Hub (the teacher-logit cache pushes a dataset repo the same way).
resolve_endpoint = _resolve_endpoint
describe_failure = _describe_failure
transport_errors = _transport_errors
