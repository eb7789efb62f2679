"""The batched game environment: B games stepping in parallel, one worker process each.

A game is a TextWorld story file, a TextWorldExpress game or a ScienceWorld task variation, each named by one string
(lib.engines): a worker plays whichever engine its game needs, behind one protocol, so that nothing here or above
knows which engine answered. One process per slot rather than an engine's own batching: TextWorld has none that
resets slots alone, and the Java engines run one game per JVM (each worker starts its own, once).

Each slot plays a sequence of episodes. Episode k of this process plays game `order[k % len(games)]` (the game list
reshuffled by the seed every pass when `shuffle`), handed to slots (to groups, below) in slot order as they finish,
so the same seed and the same finishing pattern give the same games. A finished episode is reset onto the next one
at once (auto-reset); with `num_episodes` set, a slot whose episodes ran out goes idle (its state is None).

With `group_size` G > 1 the slots come in groups of G neighbours that play each episode together, for group-relative
advantages: one episode (number and game) per group, every member reset onto it from the same start. A member whose
episode ends first waits (state None) until the last one ends, then the whole group moves on at once. A playing slot
given no command holds: it does not move that step, so a caller can play whole episodes, holding a slot that has
started a new one until the others finish theirs.

`state_dict()` is the position of every slot as plain data (episode counter, group size, each slot's episode and
the commands it has sent so far; a waiting slot has neither); `load_state_dict` on a fresh BatchEnv of the same
games, seed and group size restarts each game and replays those commands, which puts a deterministic game back
exactly where it was: a resumed training run then continues the episodes of the interrupted one.

A game that fails while playing (its process dies or hangs, its engine raises, or TextWorld's emulator reports a
runtime error) is a crash: the step's result says `crashed`, the episode is truncated there, a fresh process replaces
the old one and the slot moves on; each crashing game is reported once, in one warning line. A game that fails to start
raises GameProcessError, naming it; `start_failures` starts each game of a list once, to check them up front.

Why our own processes rather than TextWorld's AsyncBatchEnv: it resets all games together, while RL wants each
slot to move on alone; and a worker that dies or hangs must be replaced without losing the others.
"""

import hashlib
import multiprocessing as mp
import os
import random
import signal
import sys
import types
from dataclasses import dataclass

from lib.engines import ENGINE_CLASSES, engine_of
from lib.prompts import clean_inventory, clean_observation

STEP_TIMEOUT_S = 60.0
# A reset may load its game first, which takes longer than a step: ScienceWorld's first load of a task on a fresh JVM
# took 20-70 s on this 2-core machine while other jobs held it (load average 13).
RESET_TIMEOUT_S = 300.0


class GameProcessError(RuntimeError):
    """A game that cannot be played: it does not start, or keeps crashing its process; the message names it."""


@dataclass
class GameState:
    """What one game shows after a reset or a step; plain data, safe to send between processes."""

    game: str
    episode: int
    observation: str
    score: float  # TextWorld's points; the fraction of the task done for the other engines (lib.engines)
    max_score: float
    moves: int
    won: bool
    lost: bool
    admissible_commands: list[str]
    objective: str
    inventory: str
    walkthrough: list[str] | None
    steps: int = 0  # commands sent in this episode (TextWorld's `moves` skips some)
    location: str = ""  # the room the player is in, where the engine says (TextWorld); else ''


def state_key(state: GameState) -> str:
    """A short name of the environment state a turn is played from, equal for equal states (GiGPO's step groups):
    a hash of the game, the score, the cleaned observation, the inventory and the admissible commands. TextWorld is
    deterministic, so this is the state as the player can know it: the observation alone would merge different rooms
    that answer alike ("You can't go that way."), and the admissible commands tell them apart (the room's exits and
    objects, what is open); the score tells apart the same room before and after a scoring action. Left out: the
    turn number and the history, so that episodes that reach a state by different paths, or one episode twice,
    share it."""
    parts = [state.game, str(state.score), clean_observation(state.observation, state.objective),
             clean_inventory(state.inventory), *sorted(state.admissible_commands)]
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


@dataclass
class StepResult:
    """One slot's step: the reward (score change), how the episode ended, and the state to act on next."""

    command: str
    reward: float
    terminated: bool
    truncated: bool
    state: GameState  # right after the command: the final state when the episode ended
    # The state to act on next: a new episode's after an auto-reset, None when idle or waiting for its group.
    next_state: GameState | None
    crashed: bool = False  # the game's process died or hung, or its engine failed (lib.engines): truncated here
    invalid: bool = False  # the command was not among the admissible ones

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _worker(conn) -> None:
    """Serve ('reset', game) and ('step', command) requests for one game at a time until ('close', None) or until
    the parent is gone; each engine (lib.engines) starts on the first game it plays and stays for the next ones.

    A request the game cannot answer (it does not load, raises, or its emulator breaks down) is answered with
    {'error': one line}: the parent decides what it means and reports it once, instead of every worker dying with a
    traceback on stderr.
    """
    # Ctrl-C in a terminal reaches the whole process group: the parent stops its games itself (close(), or the
    # termination of daemonic children at its exit), so a worker must not die with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engines, engine = {}, None
    while True:
        try:
            request, argument = conn.recv()
        except EOFError:  # the parent exited without closing us (a run stopped by an error): no traceback of ours
            break
        if request == "close":
            break
        try:
            if request == "reset":
                kind = engine_of(argument)
                engine = None  # a game that fails to start leaves nothing to step
                if kind not in engines:
                    engines[kind] = ENGINE_CLASSES[kind]()
                answer = engines[kind].reset(argument)
                engine = engines[kind]
            else:
                answer = engine.step(argument)
        except Exception as error:  # noqa: BLE001 - whatever the game raises is its failure, sent to the parent
            answer = {"error": _one_line(error)}
        conn.send(answer)
    for engine in engines.values():
        engine.close()
    conn.close()


class _Worker:
    """One game process and its pipe; replaced whole when it dies or hangs."""

    def __init__(self, context):
        self.context = context
        self.start()

    def start(self):
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child,), daemon=True)
        # forkserver children re-run the parent's main script (its __file__ or module name) before the target: for a
        # training script that is torch, transformers, ... again in every worker, seconds of CPU each (16 workers on
        # 2 cores: ~90 s of start-up). `_worker` needs none of it, so the start sees a main module without either.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.process.start()
        finally:
            sys.modules["__main__"] = main
        child.close()

    def send(self, request, argument) -> bool:
        try:
            self.conn.send((request, argument))
            return True
        except (BrokenPipeError, EOFError, OSError):
            return False

    def receive(self, timeout: float) -> dict | None:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def restart(self):
        self.kill()
        self.start()

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _context():
    """forkserver processes that import TextWorld once, in the server, not in every worker."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["textworld"])
    return context


def _close_all(workers: list[_Worker]) -> None:
    for worker in workers:  # all asked first, so that they shut down in parallel
        worker.send("close", None)
    for worker in workers:
        worker.process.join(timeout=5)
        worker.kill()


def start_failures(games: list[str], timeout: float = RESET_TIMEOUT_S) -> dict[str, str]:
    """Start every game and look around once (a reset and a `look` on a worker process, a few games in parallel):
    {game: why it failed, one line} for the games that fail, empty when all play."""
    context = _context()
    workers = [_Worker(context) for _ in range(min(len(games), os.cpu_count() or 1))]
    failures = {}
    try:
        for first in range(0, len(games), len(workers)):
            playing = list(zip(workers, games[first:first + len(workers)]))
            for request, argument in (("reset", None), ("step", "look")):
                for worker, game in playing:
                    worker.send(request, game if argument is None else argument)
                for worker, game in playing:
                    answer = worker.receive(timeout)
                    if answer is None:
                        failures[game] = f"its process died or hung (no answer within {timeout:.0f} s)"
                        worker.restart()
                    elif "error" in answer:
                        failures[game] = answer["error"]
                playing = [(worker, game) for worker, game in playing if game not in failures]
    finally:
        _close_all(workers)
    return failures


class BatchEnv:
    """B games of any engines in parallel processes with auto-reset, step limits and crash recovery.

    `games` is split by `rank` over `world_size` processes of a distributed run. `reset()` returns the first states;
    `step(commands)` takes one command per slot and returns one StepResult (or None) per slot; `states` is then what
    every slot acts on next. Slots [g*G, (g+1)*G) for G = `group_size` form group g: they play the same episode from
    the same start, a member that ends first waits (state None, its command ignored) and the group is reset together
    when its last member ends. A slot holds (does not move, result None) when its command is None.
    """

    def __init__(
        self,
        games: list[str],
        num_envs: int,
        max_episode_turns: int = 50,
        num_episodes: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        step_timeout: float = STEP_TIMEOUT_S,
        group_size: int = 1,
    ):
        if not games:
            raise ValueError("no games given to the environment")
        if world_size > len(games):
            raise ValueError(
                f"{world_size} processes but only {len(games)} games: every process needs at least one game; "
                "use more games or fewer processes"
            )
        if num_envs < 1 or max_episode_turns < 1 or group_size < 1:
            raise ValueError("num_envs, max_episode_turns and group_size must be at least 1")
        if num_envs % group_size:
            raise ValueError(
                f"num_envs={num_envs} is not divisible by group_size={group_size}: each group needs {group_size} slots"
            )
        self.games = list(games)[rank::world_size]
        self.num_envs = num_envs
        self.group_size = group_size
        self.max_episode_turns = max_episode_turns
        self.num_episodes = num_episodes
        self.shuffle = shuffle
        self.seed = seed
        self.step_timeout = step_timeout
        self.restarts = 0
        self._order: list[str] = []
        self._next_episode = 0
        self._assigned: list[tuple[int, str] | None] = [None] * num_envs  # None: idle or waiting for its group
        self._states: list[GameState | None] = [None] * num_envs
        self._commands: list[list[str]] = [[] for _ in range(num_envs)]  # sent in each slot's current episode
        self.crashes: dict[str, str] = {}  # game -> why it first crashed; each is reported once
        context = _context()
        self._workers = [_Worker(context) for _ in range(num_envs)]

    def _game_for_episode(self, episode: int) -> str:
        while len(self._order) <= episode:
            order = list(self.games)
            if self.shuffle:
                cycle = len(self._order) // len(self.games)
                random.Random(self.seed * 1_000_003 + cycle).shuffle(order)
            self._order += order
        return self._order[episode]

    def _take_episode(self) -> tuple[int, str] | None:
        if self.num_episodes is not None and self._next_episode >= self.num_episodes:
            return None
        episode = self._next_episode
        self._next_episode += 1
        return episode, self._game_for_episode(episode)

    def _state(self, slot: int, packed: dict, steps: int) -> GameState:
        episode, game = self._assigned[slot]
        fields = {k: v for k, v in packed.items() if k != "done"}
        return GameState(game=game, episode=episode, steps=steps, **fields)

    def _members(self, group: int) -> range:
        return range(group * self.group_size, (group + 1) * self.group_size)

    def _reset_groups(self, groups: list[int]) -> None:
        """Start the next episode on every member of each group (in group order, for determinism); idle when none
        are left."""
        slots = []
        for group in groups:
            episode = self._take_episode()
            for slot in self._members(group):
                self._assigned[slot] = episode
                slots.append(slot)
        self._start_games(slots)

    def _start_games(self, slots: list[int]) -> None:
        """Start each slot's assigned game from the beginning (idle slots: state None)."""
        pending = [s for s in slots if self._assigned[s] is not None]
        for slot in pending:
            self._workers[slot].send("reset", self._assigned[slot][1])
        for slot in pending:
            game = self._assigned[slot][1]
            reset_timeout = max(self.step_timeout, RESET_TIMEOUT_S)
            packed = self._workers[slot].receive(reset_timeout)
            while packed is None:  # a game that cannot even start on a fresh process is broken: raise then
                self._workers[slot].restart()
                self.restarts += 1
                if self.restarts > 10 * self.num_envs:
                    raise GameProcessError(f"game {game} keeps crashing its process on reset")
                self._workers[slot].send("reset", game)
                packed = self._workers[slot].receive(reset_timeout)
            if "error" in packed:  # the game itself fails to start: the same again on every try
                raise GameProcessError(f"game {game} cannot start: {packed['error']}")
            self._states[slot] = self._state(slot, packed, 0)
        for slot in slots:
            self._commands[slot] = []
            if self._assigned[slot] is None:
                self._states[slot] = None

    def reset(self) -> list[GameState | None]:
        """Start fresh: episode numbering and the game order restart from the beginning."""
        self._next_episode, self._order = 0, []
        self._reset_groups(list(range(self.num_envs // self.group_size)))
        return list(self._states)

    @property
    def states(self) -> list[GameState | None]:
        return list(self._states)

    def state_dict(self) -> dict:
        """Where every slot stands, as JSON-ready data."""
        return {
            "games": self.games, "seed": self.seed, "group_size": self.group_size, "next_episode": self._next_episode,
            "assigned": [list(assigned) if assigned else None for assigned in self._assigned],
            "commands": [list(commands) for commands in self._commands],
        }

    def load_state_dict(self, state: dict) -> list[GameState | None]:
        """Put every slot back where `state_dict()` left it (restart its game, replay its commands; a waiting slot
        has none and waits again); returns the states. Raises ValueError when the state belongs to other games,
        another seed, another number of slots or another group size."""
        if state["games"] != self.games or state["seed"] != self.seed or len(state["assigned"]) != self.num_envs:
            raise ValueError(
                f"the saved environment state is for {len(state['assigned'])} slots over {len(state['games'])} games "
                f"with seed {state['seed']}, not {self.num_envs} slots over {len(self.games)} games with seed "
                f"{self.seed}: resume with the flags of the interrupted run"
            )
        saved_group_size = state.get("group_size", 1)  # states saved before groups existed had none
        if saved_group_size != self.group_size:
            raise ValueError(
                f"the saved environment state is for group_size {saved_group_size}, not {self.group_size}: resume "
                "with the flags of the interrupted run"
            )
        self._order = []
        self._next_episode = state["next_episode"]
        self._assigned = [tuple(assigned) if assigned else None for assigned in state["assigned"]]
        self._start_games(list(range(self.num_envs)))
        for step in range(max(map(len, state["commands"]), default=0)):
            commands = [slot_commands[step] if step < len(slot_commands) else None for slot_commands in state["commands"]]
            self._replay(commands)
        return list(self._states)

    def _replay(self, commands: list[str | None]) -> None:
        """Send one command to the slots that have one, without ending episodes (they were mid-episode)."""
        slots = [s for s, command in enumerate(commands) if command is not None]
        for slot in slots:
            self._workers[slot].send("step", commands[slot])
        for slot in slots:
            packed = self._workers[slot].receive(self.step_timeout)
            if packed is None or "error" in packed:
                reason = "its process died or hung" if packed is None else packed["error"]
                raise GameProcessError(
                    f"game {self._assigned[slot][1]} crashed while replaying its saved commands: {reason}"
                )
            self._states[slot] = self._state(slot, packed, self._states[slot].steps + 1)
            self._commands[slot].append(commands[slot])

    def step(self, commands: list[str | None]) -> list[StepResult | None]:
        """Send each playing slot its command; a slot without one holds, and idle or waiting slots ignore theirs.
        Their results are None; `states` keeps every slot's state to act on next, including the new states that
        waiting members get when their group resets."""
        if len(commands) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} commands, got {len(commands)}")
        moving = [s for s in range(self.num_envs) if self._states[s] is not None and commands[s] is not None]
        for slot in moving:
            self._workers[slot].send("step", commands[slot])
        results: list[StepResult | None] = [None] * self.num_envs
        finished = []
        for slot in moving:
            before = self._states[slot]
            packed = self._workers[slot].receive(self.step_timeout)
            crashed = packed is None or "error" in packed
            if crashed:
                # The process died or hung, or the game failed: a fresh process replaces it, and the episode ends
                # truncated where it stood.
                self._report_crash(before.game, "its process died or hung" if packed is None else packed["error"])
                self._workers[slot].restart()
                self.restarts += 1
                after = GameState(**{**before.__dict__, "steps": before.steps + 1})
                terminated = False
            else:
                after = self._state(slot, packed, before.steps + 1)
                terminated = packed["done"] or after.won or after.lost
            truncated = not terminated and (crashed or after.steps >= self.max_episode_turns)
            results[slot] = StepResult(
                command=commands[slot],
                reward=float(after.score - before.score),
                terminated=terminated,
                truncated=truncated,
                state=after,
                next_state=after,
                crashed=crashed,
                invalid=commands[slot] not in before.admissible_commands,
            )
            self._states[slot] = after
            self._commands[slot].append(commands[slot])
            if terminated or truncated:
                finished.append(slot)
        for slot in finished:
            # Waiting looks like idle (nothing to replay); the group's playing members tell the two apart.
            self._states[slot], self._assigned[slot], self._commands[slot] = None, None, []
        ended_groups = sorted({slot // self.group_size for slot in finished})
        self._reset_groups([g for g in ended_groups if all(self._states[s] is None for s in self._members(g))])
        for slot in finished:
            results[slot].next_state = self._states[slot]
        return results

    def _report_crash(self, game: str, reason: str) -> None:
        """One warning line per game, the first time it crashes (a broken game may crash every episode)."""
        if game not in self.crashes:
            self.crashes[game] = reason
            print(f"warning: game {game} crashed ({reason}): its episode is cut short and counted as crashed, and "
                  "the game restarts on a fresh process", file=sys.stderr)

    def close(self) -> None:
        _close_all(self._workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
