use clap::Parser;

fn main() {
    let cli = caml_wgpu::cli::Cli::parse();
    if let Err(e) = caml_wgpu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
