"""Where each file of a raw NSD release lives, relative to the NSD root (see data/README.md).

One place for the paths, so the simulator (which writes the layout) and the reader (which reads it)
cannot drift apart. Nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Per-subject facts of the real NSD release (subj01..subj08).
NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
NSD_ROI_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
NSD_TRIALS_PER_SESSION = 750
NSD_N_SHARED = 1000
NSD_BETA_SCALE = 300.0  # betas are stored as percent signal change x 300 (int16)
BETAS_DIRNAME = "betas_fithrf_GLMdenoise_RR"
HEMISPHERES = ("lh", "rh")


@dataclass(frozen=True)
class NSDLayout:
    """Paths of a raw NSD tree rooted at ``root`` (real or simulated: the same layout)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # shared experiment files
    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def stim_info(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    # per subject
    def betas_dir(self, subject: int, space: str = "func1pt8mm") -> Path:
        return self.root / f"nsddata_betas/ppdata/subj{subject:02d}/{space}/{BETAS_DIRNAME}"

    def betas_nifti(self, subject: int, session: int) -> Path:
        return self.betas_dir(subject) / f"betas_session{session:02d}.nii.gz"

    def betas_hdf5(self, subject: int, session: int) -> Path:
        return self.betas_dir(subject) / f"betas_session{session:02d}.hdf5"

    def betas_mgh(self, subject: int, session: int, hemi: str) -> Path:
        return self.betas_dir(subject, "fsaverage") / f"{hemi}.betas_session{session:02d}.mgh"

    def ncsnr(self, subject: int) -> Path:
        return self.betas_dir(subject) / "ncsnr.nii.gz"

    def nsdgeneral(self, subject: int) -> Path:
        return self.root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"

    def responses(self, subject: int) -> Path:
        return self.root / f"nsddata/ppdata/subj{subject:02d}/behav/responses.tsv"

    def subjects_on_disk(self) -> list[int]:
        """Subjects that have a betas folder (volumetric or fsaverage)."""
        base = self.root / "nsddata_betas/ppdata"
        if not base.is_dir():
            return []
        return sorted(
            int(p.name[4:]) for p in base.iterdir() if p.name.startswith("subj") and p.name[4:].isdigit()
        )

    def sessions_on_disk(self, subject: int, space: str = "func1pt8mm") -> list[int]:
        """Sessions with a betas file, in order: volumetric (NIfTI or its HDF5 twin) or, for
        ``space="fsaverage"``, sessions with both hemispheres' ``.mgh`` files."""
        folder = self.betas_dir(subject, space)
        if not folder.is_dir():
            return []
        if space == "fsaverage":
            per_hemi = []
            for hemi in HEMISPHERES:
                digits = (
                    p.name[len(f"{hemi}.betas_session") :].split(".")[0] for p in folder.glob(f"{hemi}.*.mgh")
                )
                per_hemi.append({int(d) for d in digits if d.isdigit()})
            return sorted(per_hemi[0] & per_hemi[1])
        found = set()
        for p in folder.glob("betas_session*"):
            digits = p.name[len("betas_session") :].split(".")[0]
            if digits.isdigit():
                found.add(int(digits))
        return sorted(found)
