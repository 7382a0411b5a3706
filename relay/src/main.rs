fn main() -> std::process::ExitCode {
    tlsrelay::cli::main()
}
