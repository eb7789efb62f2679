"""A curriculum over stages of training games (ppo_textworld.py's --train_games 'A > B > ...', lib.games.stages).

Training plays stage 1's games until the win rate of its last `window` finished training episodes reaches
`threshold`, then stage 2's, and so on; the last stage plays to the end of the run. The window must be full before
it decides, so that a few lucky first episodes do not move the run on; it starts empty with each stage. Its state is
plain data for the trainer state, so that a resumed run continues in the same stage with the same record.
"""


class Curriculum:
    def __init__(self, num_stages: int, threshold: float, window: int, state: dict | None = None):
        if num_stages < 1 or window < 1 or not 0 <= threshold <= 1:
            raise ValueError("a curriculum needs a stage, a window of at least one episode and a threshold in [0, 1]")
        self.num_stages, self.threshold, self.window = num_stages, threshold, window
        self.stage, self.wins = 0, []
        if state is not None:
            self.stage, self.wins = int(state["stage"]), [bool(won) for won in state["wins"]]

    def record(self, won: list[bool]) -> None:
        """The finished training episodes of an iteration (won or not, in a fixed order), oldest first."""
        self.wins = (self.wins + [bool(episode) for episode in won])[-self.window:]

    def win_rate(self) -> float:
        """The win rate over the stage's recorded episodes (0 before any)."""
        return sum(self.wins) / len(self.wins) if self.wins else 0.0

    def ready(self) -> bool:
        """Whether the run moves to the next stage: there is one, the window is full and its win rate is enough."""
        return (self.stage + 1 < self.num_stages and len(self.wins) == self.window
                and self.win_rate() >= self.threshold)

    def advance(self) -> None:
        self.stage, self.wins = self.stage + 1, []

    def state_dict(self) -> dict:
        return {"stage": self.stage, "wins": list(self.wins)}
