"""The end of a run: the report and model card written into the checkpoint, the folder swapped into `output_dir`
whole, and the optional push to the Hub.
"""

from __future__ import annotations

import os

from .context import RunContext
from .plan import check_output_dir
from .report import jsonable


def write_output(ctx: RunContext) -> None:
    """Save the report and the model card into the checkpoint, then put it at `output_dir` ([`replace_output`])."""
    from ..model_cards import build_model_card, save_report

    plan, report, ckpt = ctx.plan, ctx.report, ctx.checkpoint
    ta, task = plan.training_args, plan.task
    guard = report["quality_guard"]
    save_report(report, ckpt)
    meta = task.card_metadata()
    techniques = plan.techniques
    summary = f"A compressed `{report.get('architecture', 'model')}` ({task.name}): {', '.join(techniques) or 'compressed'}."
    if meta.get("label_names"):
        summary += " Labels: " + ", ".join(f"`{n}`" for n in meta["label_names"]) + "."
    summary += f" **{guard}**" if guard else ""
    search = ctx.stages.get("latency_search")
    if search:  # what `--target latency` tried, measured on the machine that ran it
        from .latency import describe_search

        why = ("the fastest of the candidates below within the budget" if search["within_budget"] else
               "the closest to the base of the candidates below (none was within the budget)")
        summary += (f"\n\nChosen by `--target latency`: `{search['chosen']}`, {why}, each timed on the machine that "
                    "ran the command:\n\n" + "\n".join(describe_search(search)))
    card = build_model_card(report, plan.recipe, plan.command, repo_id=ta.hub_model_id if ta.push_to_hub else None,
                            output_dir=ckpt, pipeline_tag=meta["pipeline_tag"], summary=summary)
    card.save(os.path.join(ckpt, "README.md"))
    replace_output(ckpt, plan.output_dir, ctx.work)
    ctx.log(f"Wrote {plan.output_dir}")


def push(ctx: RunContext) -> dict | None:
    """`--push_to_hub` (main process): upload the written folder (and with `--verify_push` download the commit and
    check it against the report); the record is added to the returned report as `push`."""
    plan = ctx.plan
    ma, ta = plan.model_args, plan.training_args
    if not ctx.main or not ta.push_to_hub:
        return None
    from ..hub import push_to_hub

    ctx.log(f"Pushing to {ta.hub_model_id}.")
    pushed = push_to_hub(plan.output_dir, ta.hub_model_id, endpoint=ma.hub_endpoint, token=ta.hub_token,
                         private=bool(ta.hub_private_repo), verify=ma.verify_push)
    record = {"repo_id": pushed.repo_id, "commit": pushed.commit_oid, "url": pushed.commit_url,
              "verified": jsonable(pushed.verified)}
    ctx.report["push"] = record
    return record


def replace_output(new: str, dest: str, work: str) -> None:
    """Put the finished folder `new` at `dest` whole: it gets the ownership marker listing its files and the
    ordinary modes, then one atomic swap ([`hf_compress.atomic.replace_dir`]) replaces an old `dest`
    (`--overwrite`, checked again here: the folder may have changed since [`~hf_compress.pipeline.plan.prepare`]);
    the old content is deleted. `work` is the run's scratch folder, deleted afterwards."""
    from ..atomic import normalize_modes, replace_dir, write_marker

    if os.path.isdir(dest) and os.listdir(dest):
        check_output_dir(dest, True, {})  # still ours, and nothing added to it meanwhile
    elif os.path.isdir(dest):
        os.rmdir(dest)  # an empty folder: nothing to keep
    write_marker(new)
    normalize_modes(new)  # 0o755 / 0o644 under umask 022, as `config.json` (transformers 5 gives the weights 0600)
    replace_dir(new, dest)
