"""Thin Nipype interfaces, one per MiDeFace step; the science lives in the package modules."""

from mideface_nipype.interfaces.apply import ApplyFaceMask, Coregister
from mideface_nipype.interfaces.bids import ReplaceRaw
from mideface_nipype.interfaces.bracket import Bracket
from mideface_nipype.interfaces.exclusion import AtlasExclusionMask
from mideface_nipype.interfaces.fill import Deface
from mideface_nipype.interfaces.headmask import HeadMask
from mideface_nipype.interfaces.outputs import Publish
from mideface_nipype.interfaces.register import ProjectSurface, RegisterAtlas
from mideface_nipype.interfaces.report import Pics, Report
from mideface_nipype.interfaces.segment import Segment, SegmentationPicture
from mideface_nipype.interfaces.stats import CollectStats

__all__ = [
    "ApplyFaceMask",
    "AtlasExclusionMask",
    "Bracket",
    "CollectStats",
    "Coregister",
    "Deface",
    "HeadMask",
    "Pics",
    "ProjectSurface",
    "Publish",
    "RegisterAtlas",
    "ReplaceRaw",
    "Report",
    "Segment",
    "SegmentationPicture",
]
