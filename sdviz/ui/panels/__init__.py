"""The app's panels, one module each: its components, its handlers (plain functions of explicit
inputs, returning named values) and its wiring. `generate` holds the controls above the tabs; every
other module is a tab with `TITLE`, `ID` and a `Panel(app)` that has `wire(app)`."""
