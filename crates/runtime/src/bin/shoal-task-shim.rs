//! The task shim on its own: `shoal-task-shim task-shim TASK_DIR`. The agent does not use it
//! (it re-executes itself); this crate's tests and other programs embedding the runtime do.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        Some(a) if a == shoal_runtime::shim::ARG => shoal_runtime::shim::main(args),
        _ => {
            eprintln!("usage: shoal-task-shim {} TASK_DIR", shoal_runtime::shim::ARG);
            std::process::ExitCode::from(64)
        }
    }
}
