//! The `tunmeter` binary: the command line lives in `tunmeter::cli`.

fn main() -> std::process::ExitCode {
    tunmeter::cli::main()
}
