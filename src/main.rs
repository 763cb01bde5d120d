//! The `mos` command-line tool: parse, dispatch, print the error chain once.
//!
//! libtorch errors (a CUDA out-of-memory, a shape libtorch refuses) reach us as
//! panics of tch's panicking ops; they are caught here and reported like any other
//! error, `Error: <libtorch's message>` with a hint and exit code 1, without a
//! backtrace. Any other panic is a bug and is reported as Rust reports panics.
use clap::Parser;
use mos::cli::Command;
use mos::runtime;

/// What bounds memory use in `command`, for the out-of-memory hint.
fn memory_hint(command: &Command) -> &'static str {
    match command {
        Command::FinetuneGroup(_) | Command::FinetuneFlat(_) | Command::BenchTrain(_) => {
            "lower --batch, or raise --batch-split (the same update in smaller micro-batches), or lower --crop"
        }
        _ => "lower --batch (images per forward pass), or --crop",
    }
}

/// `Error: …` on stderr, the C++ stack trace of a libtorch error left out, and a
/// hint where the message is a libtorch error we can advise on.
fn report(message: &str, memory: &str) {
    let text = runtime::clean_torch_message(message);
    eprintln!("Error: {text}");
    // Errors that libtorch raised: caught panics ("libtorch: ..."), and the errors
    // of tch's fallible ops passed on with `?`.
    let libtorch = message.contains("libtorch: ") || message.contains("Internal torch error");
    if let Some(hint) = libtorch
        .then(|| runtime::torch_hint(&text, memory))
        .flatten()
    {
        eprintln!("hint: {hint}");
    }
}

fn main() {
    // Die quietly on a closed pipe (`mos inspect F | head`) like other Unix tools,
    // instead of panicking in println!.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    runtime::tune_malloc();
    runtime::float32_convolutions();
    let cli = mos::cli::Cli::parse();
    let memory = memory_hint(&cli.command);
    runtime::install_panic_hook();
    let result = std::panic::catch_unwind(|| mos::commands::run(cli));
    // A libtorch error the hook silenced in a thread whose end went unnoticed.
    let background = || {
        runtime::take_recorded_torch_error()
            .map(|msg| report(&format!("libtorch: {msg} (in a background thread)"), memory))
    };
    match result {
        Ok(Ok(())) => {
            if background().is_some() {
                std::process::exit(1);
            }
        }
        Ok(Err(e)) => {
            report(&format!("{e:#}"), memory);
            background();
            std::process::exit(1);
        }
        Err(payload) => match runtime::take_torch_error(&*payload) {
            Some(msg) => {
                report(&format!("libtorch: {msg}"), memory);
                std::process::exit(1);
            }
            // A bug: the default hook has printed it; end as Rust's panics do.
            None => std::panic::resume_unwind(payload),
        },
    }
}
