"""Push a compressed checkpoint, its report and its card to the Hub as one commit, and verify what landed."""

from .push import HubPushError, PushResult, load_checkpoint, push_to_hub, verify_pushed

__all__ = ["HubPushError", "PushResult", "load_checkpoint", "push_to_hub", "verify_pushed"]
