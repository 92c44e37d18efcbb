"""``DATASHEET.md``: the questions of Gebru et al., "Datasheets for Datasets" (2021), answered in
prose from :class:`~likerank.export.facts.Facts`.

:func:`facts_text` words each fact once; the datasheet and the Croissant RAI fields both quote
it, so the two never disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from likerank.export.facts import Facts
from likerank.export.parts import Written
from pipeline.core.export_layout import SAMPLE_FIELDS


def _date(ts: datetime | None) -> str:
    return ts.date().isoformat() if ts else "unknown"


def _window(span: tuple[datetime, datetime] | None) -> str:
    if not span:
        return "at dates not recorded (no posts table rows for these posts)"
    return f"between {_date(span[0])} and {_date(span[1])}"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"


def _exposure_spans(facts: Facts) -> str:
    """The run record's group exposure spans (max / min exposure within a group), in words."""
    spans = (facts.record.get("group_exposure") or {}).get("per_source") or {}
    said = [f"{name}: the top group spans {s['top_group_span']}x in exposure, the median group "
            f"{s['median_span']}x, the widest (group {s['widest_group']}) {s['widest_span']}x"
            for name, s in sorted(spans.items())]
    warning = (facts.record.get("group_exposure") or {}).get("warning")
    return (" " + "; ".join(said) + "." if said else "") + (f" The labeler warned: {warning}." if warning else "")


def facts_text(facts: Facts) -> dict[str, Any]:
    """Each fact in words, by topic (strings, or lists of strings where Croissant wants a list)."""
    p, g = facts.params, facts.group_size
    total = sum(facts.splits.values())
    sources = ", ".join(f"{k} ({v} samples)" for k, v in sorted(facts.sources.items())) or "no platform"
    instances = ", ".join(facts.instances) or "not recorded"
    hashtags = ", ".join(f"#{h}" for h in facts.hashtags) or "a hashtag the posts table no longer records"
    opted = sum(facts.opted_out.values())
    rule = (f"Labeler {facts.labeler!r} (parameters hash {facts.params_hash}). Posts were kept when online at least "
            f"{p.get('min_age_days', '?')} days when their likes were observed, with an author of "
            f"{p.get('min_followers', '?')} to {p.get('max_followers', '?')} followers and at most "
            f"{p.get('max_tags', '?')} tags. Exposure = followers * (1 + {p.get('tag_bonus', '?')} * (n_tags - 1)), "
            f"or views where the source reports them. Per source, posts sorted by exposure (descending) are cut "
            f"into consecutive groups of {g}; within a group, posts are ranked by likes (ascending); the upper half "
            f"is labeled 1 (positive), the lower half 0. score = (rank - 0.5) / {g}. No human annotated anything "
            f"(after A. Karpathy's 2015 #selfie procedure).")
    return {
        "summary": (f"Face photos posted under {hashtags} on {sources} with a binary label: whether the post ranked "
                    f"in the upper half of its exposure group by likes (follower-normalized like rank). "
                    f"likerank labels run {facts.run_id}: {total} samples ({_counts(facts.splits)}), "
                    f"{facts.positives} positive."),
        "collection": (f"Public posts carrying {hashtags} were read through the platforms' public APIs "
                       f"({sources}; instances: {instances}) with their likes, the author's follower count, their "
                       f"tags and age; the first image of each post was downloaded and kept when a face detector "
                       f"(SCRFD) found a face. The posts were created {_window(facts.created)} and read {_window(facts.scraped)}. "
                       f"Opt-outs were honoured: authors not discoverable/indexable or marked noindex were never "
                       f"stored, and {opted} image download(s) were refused for an opt-out signal "
                       f"({_counts(facts.opted_out)}: X-Robots-Tag noai, robots.txt, TDM reservation)."),
        "sources": f"Platforms and instances: {sources}; {instances}. Hashtags: {hashtags}.",
        "preprocessing": ("Image bytes are stored as downloaded with every metadata segment (EXIF including GPS, "
                          "XMP, IPTC, comments) cut out byte by byte, pixels untouched; the EXIF orientation is kept "
                          "as the `orientation` field. Faces were detected with SCRFD-500MF; the largest box is "
                          "shipped as `face_box`."),
        "annotation": rule,
        "biases": [
            f"One hashtag ({hashtags}) and the people who use it on {', '.join(sorted(facts.sources)) or 'its platforms'}: the platforms' user demographics "
            "(age, gender, region, language) are not those of any population, and nothing here corrects for them.",
            "Likes are a popularity proxy: they reflect timing, network, platform ranking and the audience's tastes, "
            "not a property of the person photographed.",
            "Labels are relative to an exposure group (authors of similar follower counts); exposure groups of "
            f"{g} posts compare only posts of similar reach, and a wide group compares unequal audiences."
            f"{_exposure_spans(facts)}",
            "Only photos in which a detector found a face are kept; detectors miss some faces more than others.",
        ],
        "limitations": [
            "Labels are noisy (one observation of likes per post) and binary within groups.",
            f"{facts.excluded_by_tombstones} labeled row(s) were removed at export time because their author or "
            "post was forgotten on request; splits are by author and may be slightly unbalanced.",
        ],
        "uses": [
            "Research on engagement prediction from images and on the biases of engagement signals.",
            "Out of scope: identifying, recognizing or tracking people; scoring an individual's attractiveness or "
            "worth for any decision about them (hiring, dating, credit, moderation); training face recognition.",
        ],
        "impact": ("A model trained on likes learns what an audience rewarded, including its prejudices; "
                   "presenting its scores as a judgement of people would harm them."),
        "personal": [
            "Photos of people's faces (biometric-adjacent data) posted publicly by their authors.",
            "Authors are pseudonymized by a keyed hash (HMAC-SHA256) before storage; no handles, display names, "
            "profile URLs or post URLs are included, and sample keys are hashes of post ids.",
            "EXIF/GPS and all other embedded metadata are stripped from the images.",
            f"People who asked to be forgotten are removed (tombstones: {_counts(facts.tombstoned)}); "
            f"{facts.excluded_by_tombstones} row(s) of this run were left out at export time for that reason.",
        ],
        "maintenance": ("Takedowns: `likerank forget` removes a person from every table and tombstones them; "
                        "re-export (`likerank export`) to publish a copy without them, and replace earlier copies. "
                        "Each export's export.json names the labels run, its content hash and the table versions."),
    }


def render(facts: Facts, fmt: str, files: list[Written], version: str) -> str:
    """The datasheet in Markdown."""
    t = facts_text(facts)
    total = sum(facts.splits.values())
    data = [w for w in files if w.samples or w.missing]
    missing = sum(w.missing for w in data)
    rows = "\n".join(f"| `{w.name}` | {w.split} | {w.samples} |" for w in data)
    fields = "\n".join(f"- `{k}`: {v}" for k, v in SAMPLE_FIELDS.items())
    bullets = lambda items: "\n".join(f"- {i}" for i in items)  # noqa: E731 - one-line helper
    return f"""# Datasheet: likerank labels run {facts.run_id} ({fmt})

Following Gebru et al., "Datasheets for Datasets" (2021). Written by likerank {version} from the
run's record and tables; `export.json` has the exact versions, `croissant.json` the same facts
in machine-readable form.

## Motivation

{t['summary']} It exists to study how engagement (likes) relates to how a photo looks, with
likes normalized by the author's reach, and to train and evaluate models of that relation.
It was made with likerank, an open-source pipeline; no one funded a specific collection.

## Composition

Each instance is one public post's first image that contains a face, with its label and the
fields below. {total} instances: {_counts(facts.splits)}; {facts.positives} positive,
{total - facts.positives} negative; by platform: {_counts(facts.sources)}. Splits are disjoint
by author. The images are the photos as posted (metadata removed), not a sample of any
population. {missing} labeled image(s) were no longer in the image store and are not included.

{fields}

| file | split | samples |
| --- | --- | --- |
{rows}

Personal data:

{bullets(t['personal'])}

## Collection process

{t['collection']}

The label needs likes observed at least `min_age_days` after posting, so collection and labeling
are weeks apart. Authors were not asked for consent individually; public posting, the platforms'
discoverability settings and machine-readable opt-outs were taken as the signal, and anyone can
ask to be removed (see Maintenance).

## Preprocessing, cleaning and labeling

{t['preprocessing']}

{t['annotation']}

Rows in and out of the run, with drops by reason, are in the run's record
(`{facts.record.get('rows_out', total)}` rows out; drops: {_counts(facts.record.get('dropped') or {})}).

## Uses

{bullets(t['uses'])}

Known biases and limitations:

{bullets(t['biases'] + t['limitations'])}

{t['impact']}

## Distribution

The rights to each photo remain with its author; likerank grants none. This export is for
research use; redistribute it only under the same terms, with this datasheet. Format: {fmt}
(see `export.json`). Takedowns go through `likerank forget` plus a fresh export.

## Maintenance

{t['maintenance']} The export is derived: fixes happen upstream (scrape, label, validate,
publish) and are carried by exporting again.
"""
