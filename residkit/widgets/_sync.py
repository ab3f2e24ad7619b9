"""Updating a ``FigureWidget`` in place from a freshly built figure."""

import plotly.graph_objects as go

__all__ = ["sync"]


def sync(target: go.FigureWidget, source: go.Figure) -> None:
    """Copy ``source``'s traces and title/shapes into ``target`` in place (one message).

    The widget's traces stay the same objects (click handlers stay attached, the front end
    restyles instead of redrawing); both figures come from the same builder, so the traces
    correspond one to one.
    """
    with target.batch_update():
        for old, new in zip(target.data, source.data, strict=True):
            props = new.to_plotly_json()
            # A property the new figure leaves unset (cell text on a large model) must be
            # cleared, not kept from the previous model.
            props.update({key: None for key in old.to_plotly_json() if key not in props})
            props.pop("type", None)
            props.pop("uid", None)
            old.update(props, overwrite=True)
        target.layout.title = source.layout.title
        target.layout.shapes = source.layout.shapes
