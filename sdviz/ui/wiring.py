"""What panels share: the `App` context (models, the user's session state, the form, the view options)
and `handler`, which turns a plain function into a Gradio event handler.

A panel's handlers are module-level functions of explicit inputs that return (or yield) a dict of
named values, `{"heatmap": image, "notes": text}`. `handler(fn, outputs, models=...)` binds the
hidden arguments, maps names to the panel's components, and turns the library's teaching errors
into `gr.Error`. The HTTP API's parameters are the function's own argument names.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from ..loading import ModelUnavailableError
from . import texts
from .models import Models

PIPELINE = "pipeline"  # concurrency id of every event that runs a model: one at a time per process
STATE_TTL_S = 2 * 3600  # a user's trace is dropped two hours after their last run
USER_ERRORS = (ValueError, KeyError, IndexError)


def message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def user_error(err: BaseException) -> gr.Error:
    """A teaching message for the page: titled as advice, gone after a few seconds (so old ones don't pile
    up), and kept out of the server log, where it would look like a fault."""
    return gr.Error(message(err), duration=6, title="Not yet", print_exception=False)


def drawn(elem_id: str, label: str | None = None, **options) -> gr.Image:
    """A picture the page draws (a figure with its own title, or with a caption above it): not an input, PNG so
    thin lines and small text stay sharp, and no floating label over it (`label` still names it to screen
    readers). `options`: the rest of gr.Image's (height, buttons, visible…)."""
    return gr.Image(label=label, show_label=False, interactive=False, format="png", elem_id=elem_id, **options)


def handler(fn, outputs: dict | None = None, **bound):
    """`fn` as a Gradio handler: `bound` arguments filled in and hidden from the API, the returned or
    yielded {name: value} mapped onto `outputs` {name: component}, and ValueError / KeyError /
    IndexError shown to the user as `gr.Error` (a toast in the page, AppError through the API; gr.Error
    is itself a ValueError, and passes unchanged).
    Without `outputs` the return value passes through unchanged.
    """
    signature = inspect.signature(fn)
    params = [p for name, p in signature.parameters.items() if name not in bound]
    names = [p.name for p in params]

    def call(args, kwargs):
        return fn(**bound, **dict(zip(names, args)), **kwargs)

    def convert(values):
        if outputs is None or not isinstance(values, dict):
            return values
        return {outputs[name]: value for name, value in values.items()}

    if inspect.isgeneratorfunction(fn):

        def wrapper(*args, **kwargs):
            try:
                for values in call(args, kwargs):
                    yield convert(values)
            except gr.Error:
                raise
            except USER_ERRORS as err:
                raise user_error(err) from err

    else:

        def wrapper(*args, **kwargs):
            try:
                return convert(call(args, kwargs))
            except gr.Error:
                raise
            except USER_ERRORS as err:
                raise user_error(err) from err

    functools.update_wrapper(wrapper, fn)
    del wrapper.__wrapped__  # Gradio reads the signature set here, without the bound arguments
    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k not in bound}
    return wrapper


@contextlib.contextmanager
def pipeline_errors(model_name: str, button: str):
    """Faults while loading or running a model → gr.Error saying what happened and that nothing was lost."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS:
        raise
    except (ModelUnavailableError, FileNotFoundError, TypeError) as err:
        raise gr.Error(f"Can't use model {model_name!r}: {err}") from err
    except Exception as err:
        raise gr.Error(
            f"The generation failed inside the pipeline ({type(err).__name__}: {err}). "
            f"Nothing was lost; press {button} to try again."
        ) from err


def zero_gpu(fn):
    """`spaces.GPU` on Hugging Face ZeroGPU; elsewhere (or without the package) the function itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


class StopRequests:
    """Stop buttons, per browser session: Stop sets its session's flag; the running job polls it.

    Made in `build_app` (never a module global); keyed by Gradio's session hash, so one user's Stop
    never stops another's run.
    """

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session_hash: str | None) -> threading.Event:
        """A fresh flag for a run that starts now in this session."""
        flag = threading.Event()
        with self._lock:
            self._flags[session_hash or ""] = flag
        return flag

    def stop(self, session_hash: str | None) -> bool:
        """Ask this session's running job to stop; False when none is running."""
        with self._lock:
            flag = self._flags.get(session_hash or "")
        if flag is None or flag.is_set():
            return False
        flag.set()
        return True

    def running(self, session_hash: str | None) -> bool:
        """Whether this session has a run going that hasn't been asked to stop."""
        with self._lock:
            flag = self._flags.get(session_hash or "")
        return flag is not None and not flag.is_set()

    def finish(self, session_hash: str | None, flag: threading.Event):
        with self._lock:
            if self._flags.get(session_hash or "") is flag:
                del self._flags[session_hash or ""]


def stop_run(request: gr.Request, *, stops: StopRequests, stopping: str) -> dict:
    """Ask this browser session's run to stop after its current step, saying `stopping` in its progress bar
    (left as it is when nothing runs)."""
    if stops.stop(getattr(request, "session_hash", None)):
        return {"progress": texts.progress_html(0, 1, 0, stopping)}
    return {"progress": gr.skip()}


def wire_stop(button: gr.Button, progress, stops: StopRequests, stopping: str = "Stopping after this step…"):
    """A Stop button for the run that writes `progress`; off the queue, so it is heard while that run holds it."""
    button.click(
        handler(stop_run, {"progress": progress}, stops=stops, stopping=stopping),
        None,
        progress,
        api_visibility="private",
        queue=False,
    )


@dataclass
class Form:
    """The generation form: the components every run (and every comparison) reads."""

    model: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    scheduler: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Textbox
    random_seed: gr.Checkbox
    width: gr.Slider
    height: gr.Slider
    keep_heads: gr.Checkbox

    def inputs(self, heads: bool = True) -> list:
        parts = [
            self.model,
            self.prompt,
            self.negative_prompt,
            self.scheduler,
            self.steps,
            self.guidance,
            self.seed,
            self.random_seed,
            self.width,
            self.height,
        ]
        return parts + [self.keep_heads] if heads else parts


@dataclass
class View:
    """How maps are drawn and which part of the trace they average (the words panel owns these
    controls; other panels read them): negative, opacity, colormap, from_step, to_step, blocks,
    resolutions, layers, head — in the order handlers take them."""

    negative: gr.Checkbox
    opacity: gr.Slider
    colormap: gr.Dropdown
    from_step: gr.Slider
    to_step: gr.Slider
    blocks: gr.CheckboxGroup
    resolutions: gr.Dropdown
    layers: gr.Dropdown
    head: gr.Dropdown

    def inputs(self) -> list:
        return [
            self.negative,
            self.opacity,
            self.colormap,
            self.from_step,
            self.to_step,
            self.blocks,
            self.resolutions,
            self.layers,
            self.head,
        ]

    def filter_triggers(self) -> list:
        """Events that change a map. Sliders listen to `input`, which a drag and a typed value + Enter
        both fire (with trigger_mode="always_last" a drag renders only its last position)."""
        return [
            self.from_step.input,
            self.to_step.input,
            self.opacity.input,
            self.blocks.input,
            self.resolutions.input,
            self.layers.input,
            self.head.input,
            self.colormap.input,
        ]


@dataclass
class Refresher:
    """A panel's redraw after a new run (see `App.after_run`), and the run it last drew (per session)."""

    tab: str | None  # the tab it lives in (None: always on screen)
    fn: Callable  # a `handler(...)`: its inputs → {component: value}
    inputs: list
    outputs: list
    drawn: gr.State  # the `Session.serial` of the run it last drew
    options: dict


@dataclass
class App:
    """What the composer hands every panel."""

    models: Models
    session: gr.State  # the user's last run: a `Session`, or None before the first
    stops: StopRequests
    most_steps: int  # the largest number of steps any offered model can record (slider maxima)
    form: Form | None = None  # set by the generate panel
    view: View | None = None  # set by the words panel
    word: gr.Radio | None = None  # the words panel's chosen word
    new_run: list = field(default_factory=list)  # events after which `session` holds a new run
    examples: list[str] = field(default_factory=list)
    step: gr.Slider | None = None  # the step-by-step panel's step slider (1-based)
    tabs: gr.Tabs | None = None  # the tabs under the controls: `gr.Tabs(selected=ID)` opens a panel's tab
    visible: gr.State | None = None  # per session: the ID of the tab on screen
    refreshers: list = field(default_factory=list)
    wiring_tab: str | None = None  # set by the composer while a panel wires itself
    tab_changes: list = field(default_factory=list)  # events after which another tab is on screen

    def after_run(self, fn, inputs, outputs, **kwargs):
        """Redraw a panel with `fn` when it shows a run it hasn't drawn yet: after a new run if its tab is
        on screen, else when its tab is opened. A run makes every panel stale, but only what is seen is
        drawn (on a shared CPU, drawing all ten tabs after every run would take longer than the run)."""
        self.refreshers.append(Refresher(self.wiring_tab, fn, list(inputs), list(outputs), gr.State(None), kwargs))

    def refresh_on(self, event):
        """After `event`, which sets `visible` (e.g. a button that opens another tab), redraw the stale
        panels of the tab now on screen."""
        self.tab_changes.append(event)

    def connect_refreshers(self, tabs: dict):
        """Wire every refresher (the composer calls this once all panels are wired). `tabs`: {ID: gr.Tab}."""
        for tab_id, tab in tabs.items():
            opened = tab.select(
                lambda tab_id=tab_id: tab_id,
                None,
                self.visible,
                api_visibility="private",
                queue=False,
                show_progress="hidden",
            )
            self.tab_changes.append(opened)
        for r in self.refreshers:
            inputs, outputs = [self.visible, r.drawn, self.session, *r.inputs], [*r.outputs, r.drawn]
            options = dict(api_visibility="private", show_progress="hidden", **r.options)
            for event in self.new_run:
                event.success(_gate(r, stale_only=False), inputs, outputs, **options)
            for event in self.tab_changes:
                event.then(_gate(r, stale_only=True), inputs, outputs, **options)


def _gate(r: Refresher, stale_only: bool):
    """`r.fn`, run only when its tab is on screen (and, with `stale_only`, its run not yet drawn)."""

    def gated(visible, drawn, session, *args):
        # Nothing to draw: one skip() leaves every output as it is (an empty dict would be read as one value).
        if session is None or (r.tab is not None and visible != r.tab):
            return gr.skip()
        if stale_only and drawn == session.serial:
            return gr.skip()
        out = r.fn(*args)
        return {**(out if isinstance(out, dict) else {}), r.drawn: session.serial}

    return gated
