//! The `tunmeter` binary. Everything it does lives in the library: the command line is
//! `tunmeter::cli`.

fn main() -> std::process::ExitCode {
    tunmeter::cli::main()
}
