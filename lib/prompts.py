"""From a game's text to model input, and from model output back to one command.

Two prompt formats (`--prompt_format`):
  - `chat`: the tokenizer's chat template; past turns become user/assistant messages. Falls back to `plain` when the
    tokenizer has no template.
  - `plain`: a transcript that ends in "> ", the way the games print their own prompt.
Both hold the objective, the cleaned observation, the inventory (unless empty), the last `memory_turns` turns, an
optional hint listing the admissible commands, optional example turns and, with `mark_tried`, the commands already
played in this episode from the same observation ("Already tried here: ...": the memory of what was tried that a
greedy policy needs to stop going round in circles, however few turns the prompt shows). When the prompt is longer
than the token budget the oldest memory goes first, then the examples, then the hint's commands that `by_priority`
puts last (a kitchen can list more commands than the budget holds, ScienceWorld a thousand; the game still accepts
them; the kept ones stay in the game's order), then the observation's tail.

What cannot be cut: the instruction, the game's goal, the inventory and the question. When they alone exceed
`max_prompt_tokens` (a long goal: tw-coin_collector or tw-treasure_hunter at level 10 and more spell out a long
route), that prompt's budget grows to what they need plus OBSERVATION_TOKENS for a cut observation (and whatever
else then fits, in the order above), at most the model's context less ANSWER_TOKENS for the answer; the run goes on
and says so once (one warning line per process). Only a prompt whose fixed part does not fit the context is an error.
The model's context is the tokenizer's `model_max_length` (lib.models.fit_tokenizer_to_model sets it from the
model's config), else FALLBACK_CONTEXT_TOKENS: a tokenizer that knows none holds a huge placeholder there.
"""

import re
import sys
from dataclasses import dataclass
from itertools import chain, zip_longest

PROMPT_FORMATS = ("chat", "plain")

SYSTEM_PROMPT = (
    "You are playing a text adventure game. Read what you see and reply with exactly one short command, "
    "such as 'go north', 'take coin' or 'open door'."
)

# Generic demonstrations (not from any generated game) for `num_examples`.
EXAMPLE_TURNS = [
    ("You are in a kitchen. There is a closed fridge here. An exit leads west.", "open fridge"),
    ("You open the fridge, revealing an apple.", "take apple"),
]

# Commands that only look around; the hint leaves them out by default so the list points at progress.
EXAMINE_VERBS = ("examine", "look", "inventory")
# Words that say nothing of which object a command acts on: by_priority's relevance ignores them.
COMMON_WORDS = {"a", "an", "the", "to", "on", "in", "into", "at", "of", "from", "with", "up", "around", "door"}

OBSERVATION_TOKENS = 64  # what a grown budget leaves for the observation (and the hint) beyond the fixed part
ANSWER_TOKENS = 64  # what the context keeps for the answer (a command: a few tokens; --max_new_tokens default 10)
FALLBACK_CONTEXT_TOKENS = 2048  # the context of a model whose tokenizer knows none
_UNSET_CONTEXT = 1_000_000  # transformers' placeholder for an unknown model_max_length is int(1e30)

_warned_of_long_goals = False  # build_prompt's grown budgets are said once per process

# How the engines say that the player carries nothing: TextWorld, TextWorldExpress, ScienceWorld.
_EMPTY_INVENTORY = re.compile(
    r"carrying nothing|inventory is currently empty|in your inventory, you see:\s*nothing\s*$", re.IGNORECASE
)
_BANNER_LINE = re.compile(r"^[\s_|\\/$<>]*[_$|\\][\s_|\\/$<>]*$")
_ROOM_HEADER = re.compile(r"^\s*-=.*=-\s*$")
_TRAILING_PUNCTUATION = ".!?,;:'\"`"


def clean_observation(text: str, objective: str = "") -> str:
    """Strip the banner, room headers, the game's own '>' prompt and status line, the objective, extra blank lines."""
    text = text.replace(objective, "") if objective else text
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith(">"):
            break  # the game's prompt; the status line (room, score) is printed on the same line
        if _BANNER_LINE.match(line) or _ROOM_HEADER.match(line):
            continue
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_inventory(inventory: str) -> str:
    """'' when the player carries nothing (as any engine says it), else the inventory text."""
    inventory = inventory.strip()
    return "" if not inventory or _EMPTY_INVENTORY.search(inventory) else inventory


def hint_commands(admissible_commands: list[str], include_examine: bool = False) -> list[str]:
    if include_examine:
        return list(admissible_commands)
    return [c for c in admissible_commands if c.split(" ")[0] not in EXAMINE_VERBS]


def by_priority(commands: list[str], *, context: str = "") -> list[str]:
    """`commands` in the order a cap keeps them (score mode's candidates, a hint over the budget): verb by verb in
    turn (a `go`, a `take`, an `open`, ..., then a second of each), each verb's commands by how many of their words
    `context` (the state's text) mentions, then fewest words first; the verbs that only look around after all others.
    Why: engines list commands alphabetically and combinatorially (ScienceWorld: 100-1000 a state, hundreds of
    `move X to Y`), so a list's first commands hold one or two verbs only."""
    mentioned = content_words(context)

    def relevance(command: str) -> tuple[int, int]:  # the most mentioned, then the shortest, first
        return -len(content_words(command.partition(" ")[2]) & mentioned), len(command.split())

    acting, looking = {}, {}
    for command in commands:
        verb = command.split(" ")[0]
        (looking if verb in EXAMINE_VERBS else acting).setdefault(verb, []).append(command)
    return [command for groups in (acting, looking)
            for command in in_turn([sorted(group, key=relevance) for group in groups.values()])]


def content_words(text: str) -> set[str]:
    """The lowercase words of `text` but the ones every command shares (to, on, in, the, door, ...)."""
    return set(re.findall(r"[a-z]+", text.lower())) - COMMON_WORDS


def in_turn(groups: list[list[str]]) -> list[str]:
    """Every item: the first of each group in turn, then the second of each, and so on."""
    return [item for item in chain.from_iterable(zip_longest(*groups)) if item is not None]


def parse_command(text: str) -> str:
    """Model output -> one command: the first line, trimmed, lower-cased, without a leading '>' or trailing marks.

    Empty or garbage output stays a turn: the game answers it and it counts as invalid.
    """
    line = text.split("\n", 1)[0].strip().lstrip(">").strip().lower()
    return line.rstrip(_TRAILING_PUNCTUATION).strip()


@dataclass
class PromptConfig:
    format: str = "chat"
    memory_turns: int = 3  # each past turn costs ~60 prompt tokens; the token budget drops the oldest first
    hint: bool = True
    hint_examine: bool = False
    # Zero-shot SmolLM2-135M answers in prose without examples (every command invalid) and in commands with two.
    num_examples: int = 2
    max_prompt_tokens: int = 256
    mark_tried: bool = False  # say which commands the episode already played from this same observation

    def __post_init__(self):
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
        if self.memory_turns < 0 or not 0 <= self.num_examples <= len(EXAMPLE_TURNS):
            raise ValueError(f"memory_turns must be >= 0 and num_examples in [0, {len(EXAMPLE_TURNS)}]")
        if self.max_prompt_tokens < 32:
            raise ValueError("max_prompt_tokens must be at least 32")


@dataclass
class Turn:
    """A past turn as the model saw it: the cleaned observation, then the command it gave; and, for score mode's
    --least_tried (lib.agents.played_at), where it was played and whether it changed anything there."""

    observation: str
    command: str
    place: str = ""  # lib.agents.place_of the state it was played from
    changed: bool = True  # False: the place, score, inventory and admissible commands stayed as they were


def played_here(observation: str, history: list[Turn]) -> list[str]:
    """The commands the episode's earlier turns played from this same (cleaned) observation, in order, repeats
    included (--mark_tried names each once; score mode's --least_tried counts them)."""
    return [turn.command for turn in history if turn.observation == observation]


def current_message(observation: str, inventory: str, admissible_commands: list[str], config: PromptConfig,
                    tried: list[str] = ()) -> str:
    parts = [observation or "(nothing happens)"]
    inventory = clean_inventory(inventory)
    if inventory:
        parts.append(f"Inventory: {inventory}")
    if tried:
        parts.append("Already tried here: " + ", ".join(tried))
    if config.hint:
        commands = hint_commands(admissible_commands, config.hint_examine)
        if commands:
            parts.append("Possible actions: " + ", ".join(commands))
    parts.append("What do you do?")
    return "\n".join(parts)


def render(
    objective: str,
    message: str,
    history: list[Turn],
    examples: list[tuple[str, str]],
    config: PromptConfig,
    tokenizer,
) -> str:
    system = f"{SYSTEM_PROMPT}\nGoal: {objective}" if objective else SYSTEM_PROMPT
    turns = [Turn(o, c) for o, c in examples] + history
    if config.format == "chat" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}]
        for turn in turns:
            messages += [{"role": "user", "content": turn.observation}, {"role": "assistant", "content": turn.command}]
        messages.append({"role": "user", "content": message})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = "".join(f"{turn.observation}\n> {turn.command}\n\n" for turn in turns)
    return f"{system}\n\n{body}{message}\n> "


def build_prompt(
    objective: str,
    observation: str,
    inventory: str,
    admissible_commands: list[str],
    history: list[Turn],
    config: PromptConfig,
    tokenizer,
) -> str:
    """The prompt text for one state, within `config.max_prompt_tokens` tokens, or within a grown budget when the
    instruction, the goal and the inventory alone need more (see the module docstring).

    `observation` is already cleaned; `history` holds this episode's earlier turns, oldest first.
    """
    prompt, needed = _fit_prompt(objective, observation, inventory, admissible_commands, history, config, tokenizer,
                                 config.max_prompt_tokens)
    if needed <= config.max_prompt_tokens:
        return prompt
    # Memory, examples, hint and observation are all cut by now: only a larger budget helps.
    limit = context_tokens(tokenizer) - ANSWER_TOKENS
    if needed > limit:
        raise ValueError(
            f"the prompt needs {needed} tokens for the instruction, the game's goal and the inventory alone, over the "
            f"model's context ({limit + ANSWER_TOKENS} tokens, less {ANSWER_TOKENS} for the answer): play games with "
            "shorter goals, or a model with a longer context"
        )
    budget = min(needed + OBSERVATION_TOKENS, limit)
    global _warned_of_long_goals
    if not _warned_of_long_goals:
        _warned_of_long_goals = True
        print(f"warning: a game's goal makes the prompt need {needed} tokens before its observation, over "
              f"--max_prompt_tokens {config.max_prompt_tokens}: such prompts grow to what they need plus "
              f"{OBSERVATION_TOKENS} (this one: {budget}); raise --max_prompt_tokens to give them their memory and "
              "examples too (said once)", file=sys.stderr)
    return _fit_prompt(objective, observation, inventory, admissible_commands, history, config, tokenizer, budget)[0]


def _fit_prompt(objective, observation, inventory, admissible_commands, history, config, tokenizer, budget: int):
    """The prompt cut to `budget` tokens as far as memory, examples, hint and observation go, and its length (over
    `budget` when what cannot be cut is)."""
    # From the whole episode, before the memory is cut; each command once, first played first.
    tried = list(dict.fromkeys(played_here(observation, history))) if config.mark_tried else []
    history = history[-config.memory_turns :] if config.memory_turns else []
    examples = EXAMPLE_TURNS[: config.num_examples]

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    message = current_message(observation, inventory, admissible_commands, config, tried)
    prompt = render(objective, message, history, examples, config, tokenizer)
    while length(prompt) > budget and (history or examples):
        if history:
            history = history[1:]
        else:
            examples = []
        prompt = render(objective, message, history, examples, config, tokenizer)
    excess = length(prompt) - budget
    hinted = list(admissible_commands)
    if excess > 0 and config.hint:
        # The most commands that fit, by priority (binary search over how many of the first ones), or none.
        ranked = by_priority(admissible_commands, context=f"{objective}\n{observation}\n{inventory}")

        def listed(count: int) -> list[str]:
            kept = set(ranked[:count])
            return [command for command in admissible_commands if command in kept]

        def fits(count: int) -> bool:
            text = render(objective, current_message(observation, inventory, listed(count), config, tried), history,
                          examples, config, tokenizer)
            return length(text) <= budget

        low, high = 0, len(ranked)  # fits(high) is False
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        hinted = listed(low)
        message = current_message(observation, inventory, hinted, config, tried)
        prompt = render(objective, message, history, examples, config, tokenizer)
        excess = length(prompt) - budget
    while excess > 0 and observation:
        # Still too long: keep the observation's beginning (it names the room and what is in it).
        ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
        observation = tokenizer.decode(ids[: max(0, len(ids) - excess - 4)])
        message = current_message(observation, inventory, hinted, config, tried)
        prompt = render(objective, message, history, examples, config, tokenizer)
        excess = length(prompt) - budget
    return prompt, budget + excess


def context_tokens(tokenizer) -> int:
    """The most tokens the model reads: the tokenizer's model_max_length when it knows one, else
    FALLBACK_CONTEXT_TOKENS."""
    known = getattr(tokenizer, "model_max_length", None)
    return known if isinstance(known, int) and known < _UNSET_CONTEXT else FALLBACK_CONTEXT_TOKENS


def instruction_tokens(config: PromptConfig, tokenizer) -> int:
    """Tokens of what every prompt of this format holds whatever is cut: the instruction and the question (no
    game's goal, memory, examples, hint or observation)."""
    prompt = render("", current_message("", "", [], config), [], [], config, tokenizer)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def check_prompt_budget(config: PromptConfig, tokenizer) -> None:
    """Raise ValueError when max_prompt_tokens cannot hold even the instruction: with the tokenizer only, before a
    model loads, rather than at the first prompt."""
    needed = instruction_tokens(config, tokenizer)
    if needed > config.max_prompt_tokens:
        raise ValueError(
            f"--max_prompt_tokens {config.max_prompt_tokens} cannot hold the instruction every prompt starts with "
            f"({needed} tokens in the {config.format} format, before the game's goal and observation): raise "
            f"--max_prompt_tokens well above {needed} (default {PromptConfig.max_prompt_tokens})"
        )


def answer_text(command: str, config: PromptConfig, tokenizer) -> str:
    """What the policy writes after a prompt to give `command`: the command, then what ends a reply in the prompt's
    format (the end-of-turn token of a chat template, a newline in a plain transcript), the places generation stops."""
    if config.format == "chat" and getattr(tokenizer, "chat_template", None):
        return command + tokenizer.eos_token
    return command + "\n"
