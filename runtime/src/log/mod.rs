//! Training logs (spec §10): console lines in the reference's format, the step progress with
//! evaluation time excluded, and TensorBoard event files with the tag set of each mode.
//!
//! * [`console`] formats lines (`[time] [INFO] [qplc] …`, the step line, eval lines);
//! * [`progress`] times steps and prints the lines (with a bar on a terminal);
//! * [`tfevents`] writes and reads `events.out.tfevents.*` files;
//! * [`scalars`] says which TensorBoard scalars each mode writes (check 49).
pub mod console;
pub mod progress;
pub mod scalars;
pub mod tfevents;

pub use progress::{Progress, StepClock};
pub use scalars::{aggregate, step_scalars, tags, StatAccumulator, Stats, StepMetrics};
pub use tfevents::{read_events, read_scalars, EventWriter};
