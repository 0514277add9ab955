"""Named sizes of the simulated NSD: ``tiny`` (tests), ``demo`` (``make demo``), ``full`` (NSD-sized).

A preset is a frozen dataclass that checks itself in ``__post_init__``: the experiment must add up the
way NSD's does (every image of a subject shown 3 times over ``max(sessions) x trials_per_session`` trial
slots, as NSD's 30000 = 40 x 750 = 3 x 10000), so a bad override fails with one clear line instead of a
half-written tree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from brainit_pl.data.layout import NSD_SESSIONS, NSD_TRIALS_PER_SESSION
from brainit_pl.errors import BrainITError, require

N_REPEATS = 3  # every image is shown three times, as in NSD


@dataclass(frozen=True)
class SimPreset:
    """Sizes of one simulated NSD.

    Attributes:
        name: preset name (``tiny``, ``demo``, ``full``).
        sessions: sessions of each subject (subject 1 first); its length is the number of subjects.
            The design (``masterordering``) is built for ``max(sessions)``; subjects with fewer sessions
            stop earlier, as in NSD.
        trials_per_session: stimulus trials per session (NSD: 750).
        runs_per_session: runs per session (NSD: 12).
        blanks_per_run: blank trial slots per run in ``stimpattern`` (NSD: 75 slots, 62-63 stimuli).
        n_shared: images seen by every subject (NSD's shared1000); they come first in ``subjectim``.
        voxel_mm: isotropic voxel size of the simulated functional volumes (NSD: 1.8 mm).
        image_size: side S of the stimuli in ``nsd_stimuli.hdf5`` (NSD: 425).
        feature_size: side of the images the response model sees (features are computed at a reduced
            resolution so that 10k+ images stay fast); pRF pooling happens at ``feature_size // 2``.
    """

    name: str
    sessions: tuple[int, ...]
    trials_per_session: int
    runs_per_session: int
    blanks_per_run: int
    n_shared: int
    voxel_mm: float
    image_size: int
    feature_size: int

    def __post_init__(self) -> None:
        require(len(self.sessions) >= 1, f"preset {self.name!r}: needs at least one subject")
        require(
            all(s >= 1 for s in self.sessions),
            f"preset {self.name!r}: every subject needs >= 1 session, got {list(self.sessions)}",
        )
        require(self.trials_per_session >= 1, f"preset {self.name!r}: trials_per_session must be >= 1")
        require(
            1 <= self.runs_per_session <= self.trials_per_session,
            f"preset {self.name!r}: runs_per_session must be in 1..trials_per_session",
        )
        require(self.blanks_per_run >= 0, f"preset {self.name!r}: blanks_per_run must be >= 0")
        total = self.n_sessions_max * self.trials_per_session
        require(
            total % N_REPEATS == 0,
            f"preset {self.name!r}: {self.n_sessions_max} sessions x {self.trials_per_session} trials = "
            f"{total} trial slots, not divisible by {N_REPEATS} repeats",
        )
        require(
            1 <= self.n_shared < self.n_images_per_subject,
            f"preset {self.name!r}: n_shared={self.n_shared} must be in 1..{self.n_images_per_subject - 1} "
            f"(images per subject = sessions x trials / {N_REPEATS})",
        )
        require(0.5 <= self.voxel_mm <= 8.0, f"preset {self.name!r}: voxel_mm={self.voxel_mm} not in 0.5..8")
        require(
            16 <= self.image_size <= 1024,
            f"preset {self.name!r}: image_size={self.image_size} not in 16..1024",
        )
        require(
            16 <= self.feature_size <= self.image_size and self.feature_size % 2 == 0,
            f"preset {self.name!r}: feature_size={self.feature_size} must be even and in 16..image_size",
        )

    @property
    def n_subjects(self) -> int:
        return len(self.sessions)

    @property
    def n_sessions_max(self) -> int:
        return max(self.sessions)

    @property
    def n_images_per_subject(self) -> int:
        """Images each subject is assigned (NSD: 10000), shared ones included."""
        return self.n_sessions_max * self.trials_per_session // N_REPEATS

    @property
    def n_own(self) -> int:
        """Images seen by one subject only (NSD: 9000)."""
        return self.n_images_per_subject - self.n_shared

    @property
    def n_images(self) -> int:
        """Size of the whole image id space (NSD: 73000): shared + every subject's own images."""
        return self.n_shared + self.n_subjects * self.n_own

    @property
    def pool_size(self) -> int:
        """Side of the grid the pRFs pool features over."""
        return self.feature_size // 2

    def with_overrides(
        self, *, subjects: int | None = None, sessions: int | None = None, image_size: int | None = None
    ) -> SimPreset:
        """A copy resized by the CLI/benchmark overrides.

        ``subjects`` keeps the first n subjects (extra ones get the preset's last session count);
        ``sessions`` caps every subject's session count at n and rescales the shared set so that it stays
        the same fraction of each subject's images; ``image_size`` replaces S (features stay at most S).
        """
        changes: dict = {}
        sess = list(self.sessions)
        if subjects is not None:
            require(subjects >= 1, f"--subjects must be >= 1, got {subjects}")
            sess = (sess + [sess[-1]] * subjects)[:subjects]
        if sessions is not None:
            require(sessions >= 1, f"--sessions must be >= 1, got {sessions}")
            fraction = self.n_shared / self.n_images_per_subject
            sess = [min(s, sessions) for s in sess]
            if max(sess) < sessions:  # asked for more sessions than the preset has: extend every subject
                sess = [sessions] * len(sess)
            per_subject = max(sess) * self.trials_per_session // N_REPEATS
            changes["n_shared"] = max(1, min(per_subject - 1, round(fraction * per_subject)))
        changes["sessions"] = tuple(sess)
        if image_size is not None:
            changes["image_size"] = image_size
            fs = min(self.feature_size, image_size - image_size % 2)
            changes["feature_size"] = fs
        try:
            return dataclasses.replace(self, **changes)
        except BrainITError as err:
            raise BrainITError(f"{err} (after overrides subjects={subjects}, sessions={sessions})") from None


PRESETS: dict[str, SimPreset] = {
    # 2 subjects x 2 sessions x 45 trials: 30 images per subject (10 shared + 20 own) x 3 repeats.
    "tiny": SimPreset(
        name="tiny",
        sessions=(2, 2),
        trials_per_session=45,
        runs_per_session=3,
        blanks_per_run=2,
        n_shared=10,
        voxel_mm=6.0,
        image_size=64,
        feature_size=32,
    ),
    # 4 subjects (the 4th with fewer sessions, as NSD's subj03/04/06/08): 500 images per subject
    # (100 shared + 400 own) x 3 repeats = 1500 trials = 10 sessions x 150.
    "demo": SimPreset(
        name="demo",
        sessions=(10, 10, 10, 8),
        trials_per_session=150,
        runs_per_session=6,
        blanks_per_run=3,
        n_shared=100,
        voxel_mm=3.8,
        image_size=128,
        feature_size=64,
    ),
    # NSD itself: 8 subjects with NSD's session counts, 750 trials in 12 runs of 75 slots, 1000 shared +
    # 9000 own images per subject, 1.8 mm voxels, 425^2 stimuli.
    "full": SimPreset(
        name="full",
        sessions=tuple(NSD_SESSIONS[s] for s in sorted(NSD_SESSIONS)),
        trials_per_session=NSD_TRIALS_PER_SESSION,
        runs_per_session=12,
        blanks_per_run=75 - NSD_TRIALS_PER_SESSION // 12 - 1,  # 12 slots: 62/63 stimuli + blanks = 75
        n_shared=1000,
        voxel_mm=1.8,
        image_size=425,
        feature_size=64,
    ),
}


def get_preset(name: str) -> SimPreset:
    """The preset called ``name``; a :class:`BrainITError` lists the valid names otherwise."""
    if name not in PRESETS:
        raise BrainITError(f"unknown simulation preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
