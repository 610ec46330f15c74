//! The command line: `[runtime args] -- [app args]`, whitespace-separated,
//! as uhyve writes `/chosen/bootargs` and as `qemu -append` passes it.
//! Without `--`, every word is a runtime argument (uhyve's convention).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// The parsed command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// Words before `--` (for the runtime; unknown ones are ignored).
    pub runtime: Vec<String>,
    /// Words after `--`: the application's arguments.
    pub app: Vec<String>,
}

/// Splits a boot command line.
pub fn parse(cmdline: &str) -> Args {
    let mut args = Args::default();
    let mut words = cmdline.split_ascii_whitespace();
    for w in words.by_ref() {
        if w == "--" {
            args.app = words.map(ToString::to_string).collect();
            break;
        }
        args.runtime.push(w.to_string());
    }
    args
}
