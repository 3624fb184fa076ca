"""Generated from protobuf/*.proto by protobuf/generate.sh. Do not edit."""
