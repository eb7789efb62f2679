"""The Hugging Face Hub: whether it answers, working offline when it does not, checking that a push will be accepted
before any work starts, and pushing finished outputs (`tools/push_to_hub.py` pushes them again later).

Without a network every Hub client retries for about a minute before it gives up or falls back to the local cache;
one short request tells the same in seconds (HUB_TIMEOUT_S), once per process.
"""

import functools
import os
import shlex
from pathlib import Path

HUB_TIMEOUT_S = 5.0
PUSH_TOOL = "tools/push_to_hub.py"


class HubError(ValueError):
    """The Hub cannot do what a flag asks; the message names the flag and the fix."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@functools.cache
def hub_unreachable_reason() -> str | None:
    """Why the Hub does not answer (one line), or None when it does; asked once per process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - any failure (DNS, connect, timeout, proxy) means no Hub
        return _one_line(error)
    return None


def work_offline() -> None:
    """Make this process's Hub clients (transformers', datasets') and the processes it starts use the local cache only,
    instead of retrying the unreachable Hub before every file."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def is_cached_model(repo_id: str) -> bool:
    """Whether a model repo's config.json is in the local Hub cache (a model downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_push_access(repo_id: str) -> None:
    """Raise HubError unless a Hub token is set and the Hub answers and accepts it: a run that pushes its results at
    the end learns now, before it works, that the push would fail."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN)")
    reason = hub_unreachable_reason()
    if reason is not None:
        raise HubError(f"the Hugging Face Hub is unreachable ({reason}): rerun when it answers")
    try:
        HfApi().whoami()
    except Exception as error:  # noqa: BLE001 - an invalid token, a rate limit: the push would fail the same way
        raise HubError(f"the Hugging Face Hub refuses the token ({_one_line(error)}): log in again with "
                       "`hf auth login --force`") from None


def check_push_flag(repo_id: str) -> None:
    """check_push_access for `--push_to_hub REPO_ID`: the error names the flag and the way around it."""
    try:
        check_push_access(repo_id)
    except HubError as error:
        raise HubError(f"--push_to_hub {repo_id}: {error}; or drop --push_to_hub and push the outputs later with "
                       f"`{push_later_command('OUTPUT_DIR', repo_id)}`") from None


def push_later_command(output_dir: str | Path, repo_id: str) -> str:
    return f"python {PUSH_TOOL} {shlex.quote(str(output_dir))} {shlex.quote(repo_id)}"


def push_failure_message(output_dir: str | Path, repo_id: str, error: BaseException) -> str:
    """The one line that says a push failed, that nothing is lost, and the command that pushes the outputs later."""
    return (f"pushing to the Hub repo {repo_id} failed ({_one_line(error)}); the outputs are saved in {output_dir}: "
            f"push them later with `{push_later_command(output_dir, repo_id)}`")


def push_model_folder(repo_id: str, output_dir: Path, ignore_patterns: list[str], dataset) -> None:
    """output_dir (less `ignore_patterns`) to the model repo `repo_id`, and `dataset` to the dataset repo of the same
    name."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=ignore_patterns)
    dataset.push_to_hub(repo_id)
